"""Where a speculative step's time goes: the per-pass cost terms of a drafter's calibration measurements.

  python benchmarks/cost_breakdown.py [--measurements DRAFTER/.../cost_model.measurements.json] [--tag TAG]

`vllm-specx calibrate` times pure decode steps of a real engine (batch sizes x draft lengths, the whole
model-runner step and, inside it, the proposer). From those measurements, per batch size:
  plain_ms            a target step that verifies nothing (1 token per request)
  verify_ms_first     what the first extra verified token per request adds to the target step
  verify_ms_per_token the mean extra per verified token from 1 to the largest measured draft length
  draft_first_ms      the proposer at K = 1: the drafter's forward over the step's new tokens (the accepted
                      ones + the bonus token), its LM head once, vLLM's proposer bookkeeping, specx's hooks
  draft_level_ms      each further draft level (a one-token forward + LM head + bookkeeping), mean
and, as fractions of plain_ms, what one drafted token must earn to pay (the node threshold at depth 1):
  (verify_ms_first + draft_first_ms) / plain_ms. Writes benchmarks/results/cost_breakdown_<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import ROOT, packages  # noqa: E402

DEFAULT = ROOT / "vllm_specx/assets/edd-smollm2-135m/cost_models/Intel_R_Xeon_R_Processor_x2/cost_model.measurements.json"


def breakdown(rows: list[dict]) -> dict[int, dict]:
    """Calibration rows ({kind, batch_size, nodes_per_request, time_s}) -> per batch size, the cost terms (ms)."""
    target, draft = defaultdict(dict), defaultdict(dict)
    for r in rows:
        (target if r["kind"] == "target" else draft)[r["batch_size"]][r["nodes_per_request"]] = 1e3 * r["time_s"]
    out = {}
    for b in sorted(target):
        t, d = target[b], draft.get(b, {})
        plain, most = t[1], max(t)
        terms = {"plain_ms": plain, "verify_ms_first": t[2] - plain if 2 in t else None,
                 "verify_ms_per_token": (t[most] - plain) / (most - 1) if most > 1 else None,
                 "draft_first_ms": d.get(1),
                 "draft_level_ms": (d[max(d)] - d[1]) / (max(d) - 1) if d and max(d) > 1 else None}
        if terms["verify_ms_first"] is not None and terms["draft_first_ms"] is not None:
            terms["first_token_pays_above"] = (terms["verify_ms_first"] + terms["draft_first_ms"]) / plain
            terms["lookup_token_pays_above"] = terms["verify_ms_first"] / plain
        out[b] = terms
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measurements", default=str(DEFAULT))
    ap.add_argument("--tag", default="smollm2_cpu_intel")
    args = ap.parse_args()
    path = Path(args.measurements)
    model = json.loads((path.parent / path.name.replace(".measurements", "")).read_text())
    result = {"what": "per-pass cost terms of speculative decoding, from calibration measurements (ms)",
              "measurements": str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path),
              "machine": model.get("machine"), "target": model.get("target"), "drafter": model.get("drafter"),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "packages": packages(),
              "by_batch_size": breakdown(json.loads(path.read_text()))}
    out = ROOT / "benchmarks" / "results" / f"cost_breakdown_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    print("| batch | plain step | +1st verified token | +each verified token | drafter, K=1 | each further level "
          "| a drafted token pays above | a lookup token pays above |")
    print("|---|---|---|---|---|---|---|---|")
    for b, t in result["by_batch_size"].items():
        f = lambda x, p="ms": "-" if x is None else (f"{x:.1f} ms" if p == "ms" else f"{x:.2f}")  # noqa: E731
        print(f"| {b} | {f(t['plain_ms'])} | {f(t['verify_ms_first'])} | {f(t['verify_ms_per_token'])} | "
              f"{f(t['draft_first_ms'])} | {f(t['draft_level_ms'])} | {f(t.get('first_token_pays_above'), 'r')} | "
              f"{f(t.get('lookup_token_pays_above'), 'r')} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
