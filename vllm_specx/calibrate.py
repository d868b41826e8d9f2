"""`vllm-specx calibrate`: measure this machine's step costs in vLLM and store the drafter's cost model.

For each draft length k in {0 (no speculation), ks...} one real vLLM engine (in-process, so the model
runner can be timed) generates a fixed number of tokens at each batch size, ignoring EOS. Only pure
decode steps with the whole batch running count (vLLM-CPU prefills a prompt in a step of its own);
per (k, batch size) the medians over those steps give

    target time = step time - drafting time              (tokens in flight per request = k + 1)
    draft time  = time inside the proposer               (k tokens drafted per request)

For chain drafting the draft fit is the whole drafting time of a step as a function of the tokens drafted
per request (the drafter's fixed per-step work is its intercept). The fitted `CostModel` is written as
`cost_model.json` into the drafter folder, where early stop (and PCT) read their node threshold per batch
size: ``threshold(B) = marginal draft + verify cost of one more token / plain target step`` and, when
even a certainly accepted first token does not pay (``first_token_threshold(B) >= 1``), no drafting.
Measurements are specific to the machine, target, drafter, dtype and vLLM build: re-run after changing any.
"""

from __future__ import annotations

import functools
import json
import os
import re
import time
from pathlib import Path

from vllm_specx.cost_model_files import MACHINES_DIR, cost_model_candidates, find_cost_model, machine_id  # noqa: F401

_DRAFT_SECONDS = [0.0]  # time inside the proposer, accumulated by the timing wrapper (in-process engine)
_STEPS: list[tuple[int, bool, float, float]] = []  # per engine step: (requests, pure decode, step s, draft s)
_OPEN: dict = {}  # the step being timed


def _install_timers() -> None:
    """Time the proposer and each model-runner step (execute_model .. sample_tokens, which drafts)."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(SpecDecodeBaseProposer.propose, "__specx_timer__", False):
        return
    propose, execute, sample = (SpecDecodeBaseProposer.propose, GPUModelRunner.execute_model,
                                GPUModelRunner.sample_tokens)

    @functools.wraps(propose)
    def timed_propose(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return propose(self, *args, **kwargs)
        finally:
            _DRAFT_SECONDS[0] += time.perf_counter() - t0

    @functools.wraps(execute)
    def timed_execute(self, scheduler_output, *args, **kwargs):
        # a step with no newly scheduled request is a pure decode step (CPU vLLM prefills whole prompts)
        _OPEN.update(t0=time.perf_counter(), draft0=_DRAFT_SECONDS[0],
                     reqs=len(scheduler_output.num_scheduled_tokens), decode=not scheduler_output.scheduled_new_reqs)
        return execute(self, scheduler_output, *args, **kwargs)

    @functools.wraps(sample)
    def timed_sample(self, *args, **kwargs):
        out = sample(self, *args, **kwargs)
        if _OPEN:
            _STEPS.append((_OPEN["reqs"], _OPEN["decode"], time.perf_counter() - _OPEN["t0"],
                           _DRAFT_SECONDS[0] - _OPEN["draft0"]))
            _OPEN.clear()
        return out

    for fn in (timed_propose, timed_execute, timed_sample):
        fn.__specx_timer__ = True
    SpecDecodeBaseProposer.propose = timed_propose
    GPUModelRunner.execute_model, GPUModelRunner.sample_tokens = timed_execute, timed_sample


def _prompts(n: int) -> list[str]:
    from vllm_specx.eval_sets import load_prompt_set

    texts = [t for _, t in load_prompt_set("spec_bench", per_category=max(1, -(-n // 6)))]
    return (texts * (n // len(texts) + 1))[:n]


def measure(target: str, drafter: str, batch_sizes: list[int], ks: list[int], max_tokens: int,
            dtype: str = "float32") -> list[dict]:
    """Cost-model measurements (see `CostModel.fit`) from real vLLM runs: the median over pure decode
    steps of each (draft length, number of requests in the step) seen in every configuration."""
    import statistics

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the runner must run in this process
    os.environ["SPECX_EARLY_STOP"] = "0"  # fixed k: the draft length is what is being measured
    from tqdm import tqdm

    from vllm_specx.testing import generate, make_llm, shutdown

    _install_timers()
    prompts = _prompts(max(batch_sizes))
    steps: dict[int, dict[int, list[tuple[float, float]]]] = {}  # k -> requests -> [(step s, draft s)]
    context: dict[int, float] = {}
    bar = tqdm(total=(len(ks) + 1) * len(batch_sizes), desc="calibrate", unit="run")
    for k in [0] + list(ks):
        spec = None if k == 0 else {"method": "eagle3", "model": drafter, "num_speculative_tokens": k}
        llm = make_llm(target, spec, dtype=dtype, max_model_len=2048, max_num_seqs=max(batch_sizes))
        try:
            generate(llm, prompts[:2], max_tokens=8)  # warm-up
            for b in batch_sizes:
                _STEPS.clear()
                generate(llm, prompts[:b], max_tokens=max_tokens, ignore_eos=True)
                for reqs, decode, step_s, draft_s in _STEPS:
                    if decode and reqs == b:
                        steps.setdefault(k, {}).setdefault(b, []).append((step_s, draft_s))
                toks = llm.get_tokenizer()
                context[b] = sum(len(toks.encode(p)) for p in prompts[:b]) / b + max_tokens / 2
                bar.update(1)
        finally:
            shutdown(llm)
    bar.close()
    out = []
    for k, per_b in steps.items():
        for b, samples in per_b.items():
            if len(samples) < 3 or any(b not in steps.get(kk, {}) for kk in [0] + list(ks)):
                continue
            step = statistics.median(s for s, _ in samples)
            draft = statistics.median(d for _, d in samples)
            out.append({"kind": "target", "batch_size": b, "nodes_per_request": k + 1, "context_len": context[b],
                        "time_s": max(step - draft, 1e-6), "steps": len(samples)})
            if k > 0:
                out.append({"kind": "draft", "batch_size": b, "nodes_per_request": k, "context_len": context[b],
                            "time_s": max(draft, 1e-6)})
    if not out:
        raise SystemExit("calibrate: no pure decode steps were measured; raise --max-tokens")
    return out


def calibrate(target: str, drafter: str, batch_sizes: list[int], ks: list[int], max_tokens: int,
              out: str | None = None, dtype: str = "float32") -> Path:
    from vllm_specx.core.cost_model import CostModel

    if len(ks) < 1 or min(ks) < 1:
        raise SystemExit("--k needs at least one draft length >= 1 (0, no speculation, is always measured)")
    if len(ks) < 2:
        raise SystemExit("--k needs at least two draft lengths: the draft-time fit needs two points per batch size")
    points = measure(target, drafter, sorted(batch_sizes), sorted(ks), max_tokens, dtype)
    path = Path(out) if out else default_cost_model_path(drafter)
    path.with_suffix(".measurements.json").write_text(json.dumps(points, indent=1))  # kept even if the fit fails
    model = CostModel.fit(points, machine=machine_id(), target=str(target), drafter=str(drafter))
    model.save(path)
    return path




def machine_folder_name(machine: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", machine).strip("_") or "unknown"


def default_cost_model_path(drafter: str) -> Path:
    """cost_model.json for the checkpoint's own LM-head mode; cost_model.<mode>.json when SPECX_VOCAB
    selects another (a draft step's cost depends on the head; the loader prefers the matching file).
    When that file already holds another machine's measurements it is kept, and this machine's go to
    cost_models/<this machine>/ instead: calibrating on a second kind of machine loses nothing."""
    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.core.cost_model import CostModel
    from vllm_specx.vllm_adapter.vocab_head import vocab_mode

    specx = load_specx_config(drafter)
    mode = vocab_mode(specx)
    name = "cost_model.json" if mode == specx.vocab_mode else f"cost_model.{mode}.json"
    top = Path(drafter) / name
    if not top.is_file():
        return top
    try:
        theirs = CostModel.load(top).machine
    except Exception:  # an unreadable file is replaced, as before
        return top
    here = machine_id()
    return top if theirs == here else Path(drafter) / MACHINES_DIR / machine_folder_name(here) / name


def summary(path: Path, batch_sizes: list[int]) -> str:
    from vllm_specx.core.cost_model import CostModel

    m = CostModel.load(path)
    rows = [f"{'batch':>6} {'target step ms':>15} {'first-token thr':>16} {'next-token thr':>15}"]
    for b in batch_sizes:
        rows.append(f"{b:>6} {1e3 * m.target_step_time(b):>15.1f} {m.first_token_threshold(b):>16.2f} "
                    f"{m.node_threshold(b):>15.2f}")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------- CLI
HELP = "measure this machine's target/draft step costs in vLLM and store the drafter's cost model"
DESCRIPTION = __doc__


def add_arguments(parser) -> None:
    parser.add_argument("--drafter", required=True, help="specx drafter folder (cost_model.json is written there)")
    parser.add_argument("--target", default="smollm2",
                        help="HF folder of the target, or 'smollm2' (default) or 'gemma3' (Gemma-3-270M base)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4], help="draft lengths measured besides 0")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens generated per request per run")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="cost-model file (default: DRAFTER/cost_model.json, or "
                        "DRAFTER/cost_models/<this machine>/cost_model.json when the former was measured elsewhere)")


def run(args) -> int:
    from vllm_specx.checkpoint import load_specx_config

    load_specx_config(args.drafter)  # a clear error for a folder that is not a specx drafter
    from vllm_specx.models import resolve_target

    target = resolve_target(args.target)
    path = calibrate(target, args.drafter, args.batch_sizes, args.k, args.max_tokens, args.out, args.dtype)
    print(f"cost model written to {path}\n{summary(path, sorted(args.batch_sizes))}")
    return 0
