"""Issue #3's target against training budget: EDD vs the EAGLE-3 baseline at equal steps (one plot).

  python benchmarks/plot_equal_budget_steps.py   # reads the JSONs below, writes the png beside them

Every point is vLLM's mean accepted length (1 + accepted / drafts) on the same 48 Spec-Bench prompts
(8 per category), greedy, K = 5 chains, batch 1, from the acceptance runs named in RUNS. Greedy
acceptance is deterministic for a given drafter, so points from different runs compare; their speeds
are not plotted. Left: each drafter's accepted length against its training steps, one line per record
set; right: the ratio EDD / EAGLE-3 at equal steps, against the 1.1x target.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "acceptance_equal_budget_steps_smollm2_cpu_intel.png"
# (record set, drafter, training steps, results file, method key in it)
RUNS = [
    ("Alpaca + code records", "EAGLE-3", 210, "acceptance_equal_budget_smollm2_cpu_intel.json", "eagle3@1"),
    ("Alpaca + code records", "EDD", 210, "acceptance_equal_budget_smollm2_cpu_intel.json", "edd_equal@1"),
    ("Alpaca + code records", "EDD", 504, "acceptance_equal_compute_smollm2_cpu_intel.json", "edd_504@1"),
    ("mixed records", "EAGLE-3", 210, "acceptance_equal_budget_mixed_smollm2_cpu_intel.json", "eagle3_mixed@1"),
    ("mixed records", "EDD", 210, "acceptance_equal_budget_mixed_smollm2_cpu_intel.json", "edd_mixed@1"),
    ("mixed records", "EAGLE-3", 504, "acceptance_equal_budget_mixed504_smollm2_cpu_intel.json", "eagle3_mixed@1"),
    ("mixed records", "EDD", 504, "acceptance_equal_budget_mixed504_smollm2_cpu_intel.json", "edd_mixed@1"),
]
TARGET_RATIO = 1.1


def spec_bench_accept_len(file: str, method: str) -> float:
    per_set = json.loads((RESULTS / file).read_text())["runs"][method]["per_set"]
    return per_set["spec_bench"]["mean_acceptance_length"]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: dict[tuple[str, str], dict[int, float]] = {}
    for records, drafter, steps, file, method in RUNS:
        points.setdefault((records, drafter), {})[steps] = spec_bench_accept_len(file, method)

    fig, (ax_len, ax_ratio) = plt.subplots(1, 2, figsize=(12, 4.4))
    styles = {"EDD": "tab:blue", "EAGLE-3": "tab:orange"}
    for (records, drafter), by_steps in sorted(points.items()):
        steps = sorted(by_steps)
        ax_len.plot(steps, [by_steps[s] for s in steps], marker="o", color=styles[drafter],
                    linestyle="-" if records == "mixed records" else "--", label=f"{drafter}, {records}")
    ax_len.set_xlabel("training steps (same batches, loss, optimiser for both)")
    ax_len.set_ylabel("Spec-Bench mean accepted length (K = 5)")
    ax_len.legend(fontsize=8)

    for records, marker in (("Alpaca + code records", "s"), ("mixed records", "o")):
        edd, eagle3 = points.get((records, "EDD"), {}), points.get((records, "EAGLE-3"), {})
        steps = sorted(set(edd) & set(eagle3))
        if steps:
            ratios = [edd[s] / eagle3[s] for s in steps]
            ax_ratio.plot(steps, ratios, marker=marker, label=records)
            for s, r in zip(steps, ratios):
                ax_ratio.annotate(f"{r:.3f}x", (s, r), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax_ratio.axhline(TARGET_RATIO, color="gray", linestyle=":", label=f"target {TARGET_RATIO}x")
    ax_ratio.set_ylim(1.0, TARGET_RATIO + 0.02)
    ax_ratio.set_xlabel("training steps")
    ax_ratio.set_ylabel("EDD / EAGLE-3 accepted length, equal steps")
    ax_ratio.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M target, vLLM-CPU, greedy, 48 Spec-Bench prompts, batch 1")
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
