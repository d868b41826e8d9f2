"""What a target step costs with specx loaded, when it drafts nothing and as shipped, against plain decoding.

Batch 1, same prompts, every run in a fresh spawned process, modes interleaved and repeated (`--reps`) so
that drift between processes on a shared machine shows up as spread instead of as a difference:
  none       no speculation
  no_draft   the bundled drafter with every node threshold forced to 2 (SPECX_NODE_THRESHOLD=2): no
             draft token is ever proposed, so tokens per pass is 1 and the wall-time difference to
             `none` is the fixed cost specx adds to every step (drafter forward over the new token,
             its depth-0 LM head, which the early-stop decision reads, and vLLM's spec-decode bookkeeping)
  shipped    the drafter as shipped (early stop, up to --k tokens)
Runs go through bench_acceptance.run_method (engine per spawned process, warm-up, per-mode environment;
max_num_seqs 1 since the committed results, which ran an equivalent loop of their own at vLLM's default).
SPECX_PROFILE_DRAFT=1 times vLLM's proposer per step in the speculative runs. Writes
benchmarks/results/step_overhead_<tag>.{json,png}.

  python benchmarks/bench_step_overhead.py --per-category 2 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import RESULTS, add_batch1_arguments, batch1_setup, overall, run_method  # noqa: E402

MODES = {"none": None, "no_draft": {"SPECX_NODE_THRESHOLD": "2"}, "shipped": {}}  # mode -> env (None: no drafter)


def mode_figures(per_cat: dict, profile: dict | None) -> dict:
    """One run of bench_acceptance.run_method -> the per-pass figures this benchmark compares."""
    o = overall(per_cat)
    wall, tokens, passes = o["wall_s"], o["output_tokens"], o["target_passes"]
    return {"wall_s": wall, "output_tokens": tokens, "target_passes": passes, "tokens_per_s": tokens / wall,
            "ms_per_target_pass": 1e3 * wall / passes, "tokens_per_target_pass": tokens / passes,
            "drafts": o["drafts"],
            "propose_ms_per_pass": (1e3 * profile["propose_s"] / passes) if profile and profile["propose_calls"] else None,
            "per_category": {
                c: {"tokens_per_target_pass": d["output_tokens"] / d["target_passes"],
                    "tokens_per_s": d["output_tokens"] / d["wall_s"],
                    "mean_acceptance_length": 1 + d["accepted"] / d["drafts"] if d["drafts"] else None}
                for c, d in per_cat.items()}}


def interleaved_runs(target: str, specs: dict[str, dict | None], prompts: list[tuple[str, str]], reps: int,
                     max_tokens: int) -> list[dict]:
    """reps x specs at batch 1, every run in its own spawned process (run_method), specs interleaved within a
    repetition so that drift between processes shows up as spread: per repetition {name: mode_figures}."""
    from tqdm import tqdm

    bar = tqdm(total=reps * len(specs), desc="runs", unit="run")
    out = []
    for _ in range(reps):
        row = {}
        for name, spec in specs.items():
            per_cat, profile, _ = run_method(target, spec, prompts, 1, max_tokens)
            row[name] = mode_figures(per_cat, profile)
            bar.update(1)
        out.append(row)
    bar.close()
    return out


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser()
    add_batch1_arguments(ap, per_category=2)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    target, prompts, result = batch1_setup(
        args, "cost of a target step with specx loaded (batch 1): none / no_draft / shipped, interleaved")
    specs = {mode: None if env is None else {"method": "eagle3", "model": args.drafter, "num_speculative_tokens": args.k,
                                             "env": {**env, "SPECX_PROFILE_DRAFT": "1"}}
             for mode, env in MODES.items()}
    result["reps"] = interleaved_runs(target, specs, prompts, args.reps, args.max_tokens)
    summary = {}
    for mode in MODES:
        ms = [r[mode]["ms_per_target_pass"] for r in result["reps"]]
        ratio = [r[mode]["tokens_per_s"] / r["none"]["tokens_per_s"] for r in result["reps"]]
        summary[mode] = {"ms_per_target_pass_median": statistics.median(ms), "ms_per_target_pass": ms,
                         "speedup_vs_none_same_rep": ratio, "speedup_median": statistics.median(ratio),
                         "tokens_per_target_pass": statistics.median(r[mode]["tokens_per_target_pass"] for r in result["reps"]),
                         "propose_ms_per_pass": [r[mode]["propose_ms_per_pass"] for r in result["reps"]]}
    result["summary"] = summary
    out = RESULTS / f"step_overhead_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for mode, s in summary.items():
        prop = [p for p in s["propose_ms_per_pass"] if p is not None]
        print(f"{mode:9s} {s['ms_per_target_pass_median']:6.1f} ms/pass (reps {', '.join(f'{x:.1f}' for x in s['ms_per_target_pass'])}), "
              f"{s['tokens_per_target_pass']:.3f} tokens/pass, speed-up {s['speedup_median']:.2f}x"
              + (f", proposer {statistics.median(prop):.1f} ms/pass" if prop else ""))
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(result["summary"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for i, m in enumerate(modes):
        s = result["summary"][m]
        ax[0].bar(i, s["ms_per_target_pass_median"], color="C%d" % i, alpha=0.6)
        ax[0].scatter([i] * len(s["ms_per_target_pass"]), s["ms_per_target_pass"], color="k", s=12, zorder=3)
        prop = [p for p in s["propose_ms_per_pass"] if p is not None]
        if prop:
            ax[0].bar(i, statistics.median(prop), color="k", alpha=0.3, width=0.4)
        ax[1].scatter([i] * len(s["speedup_vs_none_same_rep"]), s["speedup_vs_none_same_rep"], color="C%d" % i)
    ax[0].set_xticks(range(len(modes)), modes)
    ax[0].set_ylabel("ms per target pass (dots: reps; grey: vLLM proposer)")
    ax[1].axhline(1.0, color="grey", lw=0.8)
    ax[1].set_xticks(range(len(modes)), modes)
    ax[1].set_ylabel("tokens/s vs none, same rep")
    fig.suptitle(f"{result['target']}, batch 1, {result['prompts']} Spec-Bench prompts, {result['machine']['host_cpu']} "
                 f"({result['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
