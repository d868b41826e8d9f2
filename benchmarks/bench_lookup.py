"""Prompt-lookup candidates beside the EDD drafter, against the drafter alone, vLLM's ngram and no speculation.

Batch 1, Spec-Bench (per category), every run in a fresh spawned process (bench_acceptance.run_method), methods
interleaved and repeated (`--reps`) so that drift between processes shows up as spread, not as a difference:
  none        no speculation
  ngram       vLLM's ngram method, k = --k, n-grams 2..4 (as in bench_acceptance)
  edd         the bundled drafter with lookup candidates off (SPECX_LOOKUP=0): early stop, up to --k tokens
  edd_lookup  the same drafter with lookup candidates on (SPECX_LOOKUP=1; vllm_specx/core/lookup.py): each step
              verifies the drafter's chain or the prompt-lookup chain, whichever expects more accepted tokens
Compared on output tokens per target pass and on tokens/s as a ratio to `none` of the same repetition. Writes
benchmarks/results/lookup_<tag>.{json,png}.

  python benchmarks/bench_lookup.py --per-category 4 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import RESULTS, add_batch1_arguments, batch1_setup, method_config  # noqa: E402
from bench_step_overhead import interleaved_runs  # noqa: E402

METHODS = ("none", "ngram", "edd", "edd_lookup")


def method_spec(name: str, drafter: str, k: int) -> dict | None:
    if name in ("none", "ngram"):
        return method_config(name, k)
    env = {"SPECX_LOOKUP": "1" if name == "edd_lookup" else "0", "SPECX_PROFILE_DRAFT": "1"}
    return {"method": "eagle3", "model": drafter, "num_speculative_tokens": k, "env": env}


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser()
    add_batch1_arguments(ap, per_category=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = ap.parse_args()
    if "none" not in args.methods:
        raise SystemExit("--methods must include none: every figure is a ratio to it")
    target, prompts, result = batch1_setup(
        args, "prompt-lookup candidates beside the EDD drafter (batch 1), methods interleaved per repetition")
    specs = {name: method_spec(name, args.drafter, args.k) for name in args.methods}
    result["reps"] = interleaved_runs(target, specs, prompts, args.reps, args.max_tokens)
    result["summary"] = summarise(result["reps"], args.methods)
    out = RESULTS / f"lookup_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for name, s in result["summary"].items():
        print(f"{name:10s} {s['tokens_per_target_pass']:.3f} tokens/pass, {s['ms_per_target_pass_median']:5.1f} ms/pass, "
              f"speed-up {s['speedup_median']:.2f}x (reps {', '.join(f'{x:.2f}' for x in s['speedup_vs_none_same_rep'])})")
    print(f"wrote {out}")


def summarise(reps: list[dict], methods: list[str]) -> dict:
    out = {}
    for name in methods:
        ratio = [r[name]["tokens_per_s"] / r["none"]["tokens_per_s"] for r in reps]
        cats = reps[0][name]["per_category"]
        out[name] = {
            "tokens_per_target_pass": statistics.median(r[name]["tokens_per_target_pass"] for r in reps),
            "ms_per_target_pass_median": statistics.median(r[name]["ms_per_target_pass"] for r in reps),
            "speedup_vs_none_same_rep": ratio, "speedup_median": statistics.median(ratio),
            "per_category": {c: {
                "tokens_per_target_pass": statistics.median(r[name]["per_category"][c]["tokens_per_target_pass"] for r in reps),
                "speedup_median": statistics.median(r[name]["per_category"][c]["tokens_per_s"]
                                                    / r["none"]["per_category"][c]["tokens_per_s"] for r in reps)}
                for c in cats}}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    methods = list(summary)
    cats = list(summary[methods[0]]["per_category"])
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(cats) + 1)]
        ax[0].bar(xs, [summary[m]["per_category"][c]["tokens_per_target_pass"] for c in cats]
                  + [summary[m]["tokens_per_target_pass"]], width, label=m, color=f"C{i}")
        ax[1].bar(xs, [summary[m]["per_category"][c]["speedup_median"] for c in cats] + [summary[m]["speedup_median"]],
                  width, label=m, color=f"C{i}")
    for a, ylabel in zip(ax, ("output tokens per target pass", "tokens/s vs none (same repetition, median)")):
        a.set_xticks([j + 0.4 - width / 2 for j in range(len(cats) + 1)], cats + ["overall"], rotation=30, fontsize=8)
        a.set_ylabel(ylabel)
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[0].legend(fontsize=8)
    fig.suptitle(f"{result['target']}, batch 1, {result['prompts']} Spec-Bench prompts, {len(result['reps'])} reps, "
                 f"{result['machine']['host_cpu']} ({result['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
