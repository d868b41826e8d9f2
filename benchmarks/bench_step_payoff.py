"""Whole-step payoff skipping (early_stop.step_payoff) at batch 1: the README main job (`vllm-specx demo`)
run with SPECX_STEP_PAYOFF=0 and =1, each comparing the bundled drafter with no speculation in its own
run. Writes benchmarks/results/step_payoff_smollm2_cpu_b1.{json,png}.

  python benchmarks/bench_step_payoff.py [--num-prompts 8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_acceptance import RESULTS, machine  # noqa: E402


def demo(step_payoff: str, num_prompts: int) -> dict:
    env = dict(os.environ, SPECX_STEP_PAYOFF=step_payoff)
    out = subprocess.run([sys.executable, "-m", "vllm_specx.cli", "demo", "--json", "--num-prompts", str(num_prompts)],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")  # the summary is the last thing printed
    return json.loads("\n".join(lines[start:]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=8)
    args = ap.parse_args()
    runs = {}
    for name, flag in (("payoff_off", "0"), ("payoff_on", "1")):
        runs[name] = demo(flag, args.num_prompts)
        print(name, f"{runs[name]['speedup']:.2f}x", flush=True)
    result = {"what": "README main job at batch 1 with whole-step payoff skipping off / on",
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "step_payoff_smollm2_cpu_b1.json"
    path.write_text(json.dumps(result, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    names = list(runs)
    ax[0].bar(names, [runs[n]["speedup"] for n in names])
    ax[0].axhline(1.0, color="grey", lw=0.8)
    ax[0].set_title("speed-up over no speculation")
    ax[1].bar(names, [runs[n]["edd_steps_with_drafts"] / runs[n]["edd_target_passes"] for n in names])
    ax[1].set_title("fraction of target passes with drafts")
    fig.suptitle(f"SmolLM2-135M + bundled EDD, batch 1, {result['machine']['host_cpu'] or result['machine']['gpu']}")
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
