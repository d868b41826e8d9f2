"""Where a target pass's wall time goes, per method, measured inside the engine (batch 1 by default).

  python benchmarks/bench_pass_breakdown.py --methods none ngram8 specx --tag b1_smollm2_cpu_intel

Each method runs in its own spawned process on bench_vs_vllm's prompts (chat template, greedy). The model
runner's methods are timed per engine step (wall clock; CPU runs synchronously, so each region is its own
work): the target's transformer forward (`_model_forward`), its LM head (`compute_logits`), input
preparation, the sampler with verification (`_sample`), the drafter's proposer (`propose`, every level and
the drafter's forward over the accepted tokens) and the rest of `sample_tokens` (for specx: its runner
hooks, i.e. feedback, lookup search, draft-length bookkeeping). `other` is the step's remaining time
(scheduler, output processing). Figures are ms per target pass, and shares of the pass: wall time drifts
between processes on a shared machine, shares within one process do not.
Output: benchmarks/results/pass_breakdown_<tag>.json (+ .png), with the command and the machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import _write, chat_prompts, machine, packages  # noqa: E402
from bench_vs_vllm import ALL_METHODS, PROMPT_SETS, distinct_prompts, method_spec  # noqa: E402

RUNNER_REGIONS = ("execute_model", "_prepare_inputs", "_model_forward", "sample_tokens", "_sample")


def _timed(obj, name: str, totals: dict) -> None:
    """obj.name (an instance attribute from now on) accumulates its wall time into totals[name]."""
    orig = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t0

    setattr(obj, name, timed)


def _measure(target: str, spec: dict | None, prompts: list[str], max_tokens: int) -> dict:
    """In a fresh process: generate each prompt alone, the runner's regions timed."""
    from vllm_specx.testing import generate, make_llm, shutdown

    llm = make_llm(target, spec, dtype="float32", max_model_len=2048, max_num_seqs=1)
    try:
        generate(llm, prompts[:1], max_tokens=8)  # warm-up, untimed
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        totals: dict[str, float] = defaultdict(float)
        for name in RUNNER_REGIONS:  # after specx's class-level hooks: those run inside the timed regions
            _timed(runner, name, totals)
        _timed(runner.model, "compute_logits", totals)
        if getattr(runner, "drafter", None) is not None:
            _timed(runner.drafter, "propose", totals)
        tokens = passes = drafted = 0
        t0 = time.perf_counter()
        for p in prompts:
            res = generate(llm, [p], max_tokens=max_tokens, ignore_eos=False)
            tokens += sum(len(t) for t in res.token_ids)
            passes += res.metrics.num_engine_steps
            drafted += res.metrics.num_draft_tokens
        wall = time.perf_counter() - t0
    finally:
        shutdown(llm)
    ms = {k: 1e3 * v / passes for k, v in totals.items()}
    split = {"target_forward": ms["_model_forward"], "target_lm_head": ms.get("compute_logits", 0.0),
             "input_preparation": ms["_prepare_inputs"],
             "execute_model_rest": ms["execute_model"] - ms["_model_forward"] - ms["_prepare_inputs"]
             - ms.get("compute_logits", 0.0),
             "sampler_and_verification": ms["_sample"], "drafter_propose": ms.get("propose", 0.0),
             "draft_hooks_rest": ms["sample_tokens"] - ms["_sample"] - ms.get("propose", 0.0)}
    split["other"] = 1e3 * wall / passes - ms["execute_model"] - ms["sample_tokens"]
    total = 1e3 * wall / passes
    return {"tokens_per_s": tokens / wall, "ms_per_pass": total, "tokens_per_pass": tokens / passes,
            "draft_tokens_per_pass": drafted / passes, "output_tokens": tokens, "target_passes": passes,
            "ms_per_pass_split": split, "share_of_pass": {k: v / total for k, v in split.items()}}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # suffix runs in its own interpreter (bench_vs_vllm.py), whose runner this process cannot time
    ap.add_argument("--methods", nargs="+", default=["none", "ngram8", "specx"],
                    choices=[m for m in ALL_METHODS if m != "suffix"])
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tag", default="b1_smollm2_cpu_intel")
    args = ap.parse_args()
    import multiprocessing

    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    prompts = [t for _, t in chat_prompts(target, distinct_prompts(PROMPT_SETS, args.per_category))]
    result = {"what": "per-pass wall-time split inside the engine, batch 1", "target": "SmolLM2-135M-Instruct",
              "num_prompts": len(prompts), "max_tokens": args.max_tokens, "machine": machine(),
              "packages": packages(), "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "methods": {}}
    for m in args.methods:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            result["methods"][m] = pool.apply(_measure, (target, method_spec(m, 3), prompts, args.max_tokens))
        _write(result, args.tag, "pass_breakdown")
        r = result["methods"][m]
        print(f"{m}: {r['tokens_per_s']:.2f} tok/s, {r['ms_per_pass']:.1f} ms/pass: "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["ms_per_pass_split"].items()), flush=True)
    out = _write(result, args.tag, "pass_breakdown")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    parts = list(next(iter(result["methods"].values()))["ms_per_pass_split"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = [0.0] * len(methods)
    for part in parts:
        vals = [result["methods"][m]["ms_per_pass_split"][part] for m in methods]
        ax.bar(methods, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, m in enumerate(methods):
        r = result["methods"][m]
        ax.text(i, bottom[i], f"{r['tokens_per_pass']:.2f} tok/pass", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per target pass")
    ax.set_title(f"{result['target']}, batch 1, on {result['machine']['host_cpu']} ({result['machine']['cores']} cores)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
