"""Run a real vLLM `LLM` with a speculative config and read back outputs and spec-decode metrics.

Used by the test suite (tests/conftest.py wraps it in fixtures) and by the benchmarks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


@dataclass
class SpecMetrics:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    num_engine_steps: int = 0  # target forward passes (vLLM's iteration count); batch 1: one per step

    @property
    def mean_acceptance_length(self) -> float:
        """vLLM's figure: 1 + accepted / drafts (counts only steps that drafted)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else float("nan")

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_pos] if self.num_drafts else []

    def minus(self, before: SpecMetrics) -> SpecMetrics:
        per_pos = [a - (before.accepted_per_pos[i] if i < len(before.accepted_per_pos) else 0)
                   for i, a in enumerate(self.accepted_per_pos)]
        return SpecMetrics(self.num_drafts - before.num_drafts, self.num_draft_tokens - before.num_draft_tokens,
                           self.num_accepted_tokens - before.num_accepted_tokens, per_pos,
                           self.num_engine_steps - before.num_engine_steps)


@dataclass
class RunResult:
    token_ids: list[list[int]]
    texts: list[str]
    metrics: SpecMetrics
    wall_s: float
    num_output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.wall_s if self.wall_s else float("nan")


def specx_counter(name: str) -> float:
    """specx's Prometheus counter `specx:<name>_total` in this process (0 before its first increment); the
    tests run the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so this is what /metrics shows."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(f"specx:{name}_total") or 0.0


@contextlib.contextmanager
def recording_drafts():
    """Within: every call of a specx drafter's compute_logits (EDD or an attached EAGLE-3, in this process)
    appends the argmax of its rows, the tokens it proposed, to the yielded list (one list per call, rows in
    batch order)."""
    from vllm_specx.vllm_adapter.eagle3_model import SpecxEagle3ForCausalLM
    from vllm_specx.vllm_adapter.edd_model import SpecxEddForCausalLM

    drafted: list[list[int]] = []
    classes = (SpecxEddForCausalLM, SpecxEagle3ForCausalLM)
    originals = [cls.compute_logits for cls in classes]

    def recording(original):
        def compute_logits(self, hidden_states):
            logits = original(self, hidden_states)
            drafted.append(logits.argmax(dim=-1).tolist())
            return logits

        return compute_logits

    for cls, original in zip(classes, originals):
        cls.compute_logits = recording(original)
    try:
        yield drafted
    finally:
        for cls, original in zip(classes, originals):
            cls.compute_logits = original


def read_spec_metrics(llm) -> SpecMetrics:
    m = SpecMetrics()
    for metric in llm.get_metrics():
        name = metric.name
        if name == "vllm:spec_decode_num_drafts":
            m.num_drafts += int(metric.value)
        elif name == "vllm:spec_decode_num_draft_tokens":
            m.num_draft_tokens += int(metric.value)
        elif name == "vllm:spec_decode_num_accepted_tokens":
            m.num_accepted_tokens += int(metric.value)
        elif name == "vllm:iteration_tokens_total":
            m.num_engine_steps += int(metric.count)
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            vals = [int(v) for v in metric.values]
            m.accepted_per_pos = [a + b for a, b in zip(vals, m.accepted_per_pos + [0] * len(vals))]
    return m


def make_llm(model: str, speculative_config: dict | None = None, **kwargs: Any):
    """A real vLLM engine with test-friendly defaults (eager, fp32, small KV cache on CPU).
    SPECX_LLM_KWARGS (a JSON object) overrides engine arguments for every engine a benchmark, calibration
    or demo starts, e.g. on a GPU '{"enforce_eager": false, "async_scheduling": false,
    "compilation_config": {"cudagraph_mode": "PIECEWISE"}, "dtype": "bfloat16"}'."""
    for k, v in DEFAULT_ENV.items():
        os.environ.setdefault(k, v)
    from vllm import LLM

    opts = dict(max_model_len=1024, enforce_eager=True, dtype="float32", disable_log_stats=False, seed=0)
    opts.update(kwargs)
    opts.update(llm_kwargs_from_env())
    if speculative_config is not None:
        opts["speculative_config"] = speculative_config
        if speculative_config.get("method") == "eagle3" and not {"hf_overrides", "model_impl"} & set(opts):
            from vllm_specx.models.gemma3 import eagle3_target_kwargs

            opts.update(eagle3_target_kwargs(model))  # Gemma-3: the class with auxiliary hidden states
    return LLM(model, **opts)


def llm_kwargs_from_env() -> dict:
    """SPECX_LLM_KWARGS as a dict ({} when unset); a clear error when it is not a JSON object."""
    raw = os.environ.get("SPECX_LLM_KWARGS", "").strip()
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"SPECX_LLM_KWARGS is not valid JSON ({e}): give a JSON object of vLLM engine "
                         "arguments, e.g. '{\"enforce_eager\": false}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"SPECX_LLM_KWARGS must be a JSON object of vLLM engine arguments, got {raw!r}")
    return value


def generate(llm, prompts: list, max_tokens: int = 64, temperature: float = 0.0, seed: int | None = 0,
             ignore_eos: bool = False, seeds: list[int] | None = None, **sampling: Any) -> RunResult:
    """seeds: one seed per prompt (instead of `seed` for all)."""
    from vllm import SamplingParams

    def params_for(s):
        return SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=s, ignore_eos=ignore_eos,
                              **sampling)

    params = params_for(seed) if seeds is None else [params_for(s) for s in seeds]
    before = read_spec_metrics(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    return RunResult(token_ids, [o.outputs[0].text for o in outs], read_spec_metrics(llm).minus(before), wall,
                     sum(len(t) for t in token_ids))


def run_generate(model: str, prompts: list, speculative_config: dict | None = None, max_tokens: int = 64,
                 temperature: float = 0.0, llm_kwargs: dict | None = None, isolated: bool | None = None,
                 **sampling: Any) -> RunResult:
    """Start an engine, generate, shut it down. One engine per call.

    isolated=True runs it in a fresh spawned process. Default: only for `ngram`, because the ngram
    proposer imports numba/llvmlite, after which vLLM 0.32's kernel-override scan of sys.modules
    (vllm/triton_utils/dispatcher.py) crashes on an llvmlite object when a later engine in the same
    process loads an EAGLE-style drafter.
    """
    if isolated is None:
        isolated = (speculative_config or {}).get("method") == "ngram"
    if isolated:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            return pool.apply(run_generate, (model, prompts, speculative_config, max_tokens, temperature,
                                             llm_kwargs, False), sampling)
    llm = make_llm(model, speculative_config, **(llm_kwargs or {}))
    try:
        return generate(llm, prompts, max_tokens=max_tokens, temperature=temperature, **sampling)
    finally:
        shutdown(llm)


def shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    core = getattr(engine, "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


def first_divergence(a: list[list[int]], b: list[list[int]]) -> str | None:
    """None when equal; else a description of the first differing request and position."""
    if len(a) != len(b):
        return f"different number of requests: {len(a)} vs {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            pos = next((j for j, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            return (f"request {i}: first difference at output token {pos} "
                    f"({x[pos:pos + 5]} vs {y[pos:pos + 5]}); lengths {len(x)} vs {len(y)}")
    return None


def assert_same_tokens(reference: list[list[int]], candidate: list[list[int]]) -> None:
    diff = first_divergence(reference, candidate)
    assert diff is None, f"speculative output differs from plain decoding: {diff}"
