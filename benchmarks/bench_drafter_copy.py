"""Where does the drafter miss on Spec-Bench? Offline depth-0 top-1 per category, split by copyability.

EVALUATION ONLY: the target's greedy answers to Spec-Bench prompts and its hidden states are written to
--work-dir to be scored here; nothing in the training pipeline reads that folder (never train on it).

For every answer token x_{t} (t past the prompt) the drafter predicts it at depth 0 from the target's
states up to t-2 and the token x_{t-1}, as in vLLM (blocks of length 1). A token is "copyable" when its
bigram context (x_{t-2}, x_{t-1}) occurred earlier in prompt + answer; prompt lookup (vLLM's ngram
method, n = 2) would then propose the token that followed the last occurrence. Reported per category:
the drafter's top-1 on copyable and on other tokens, prompt lookup's hit rate on copyable tokens, and,
when given an acceptance-benchmark JSON (--vllm-json, --vllm-run), vLLM's measured depth-0 acceptance
for the same categories (a check that offline scoring and serving agree). Writes
benchmarks/results/drafter_copy_<tag>.{json,png}.

  python benchmarks/bench_drafter_copy.py --work-dir /tmp/specx-eval --per-category 6 \
      --vllm-json benchmarks/results/acceptance_drafter_data_smollm2_cpu.json --vllm-run edd_docs_k5@1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import RESULTS, machine  # noqa: E402


def copy_split(tokens: list[int], prompt_len: int, pred: torch.Tensor) -> list[tuple[bool, bool, bool]]:
    """Per answer token: (drafter right, copyable, prompt lookup right). pred[i] predicts tokens[prompt_len + i]."""
    last_after: dict[tuple[int, int], int] = {}  # bigram -> index of the token that followed it, last seen
    for t in range(2, prompt_len):
        last_after[(tokens[t - 2], tokens[t - 1])] = t
    out = []
    for t in range(prompt_len, len(tokens)):
        key = (tokens[t - 2], tokens[t - 1])
        seen = last_after.get(key)
        out.append((int(pred[t - prompt_len]) == tokens[t], seen is not None, seen is not None and tokens[seen] == tokens[t]))
        last_after[key] = t
    return out


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--drafter", default=str(Path(__file__).resolve().parents[1] / "vllm_specx/assets/edd-smollm2-135m"))
    ap.add_argument("--work-dir", required=True, help="evaluation-only folder for answers and target states")
    ap.add_argument("--per-category", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--vllm-json", default=None)
    ap.add_argument("--vllm-run", default="edd_docs_k5@1")
    ap.add_argument("--tag", default="smollm2_cpu")
    args = ap.parse_args()

    from safetensors import safe_open

    from vllm_specx.eval_sets import load_prompt_set
    from vllm_specx.models import smollm2_path
    from vllm_specx.training import data as D
    from vllm_specx.training.export import load_edd, target_embedding_and_head

    target = str(smollm2_path())
    pairs = load_prompt_set("spec_bench", per_category=args.per_category)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "EVALUATION_ONLY").write_text("Spec-Bench answers and target states for scoring; never train on them.\n")
    answers = work / "responses.jsonl"
    D.generate_responses(target, [t for _, t in pairs], answers, args.max_tokens, max_model_len=2048)
    with safe_open(str(Path(target) / "model.safetensors"), "pt") as f:
        embed, head = target_embedding_and_head(f.get_tensor, f.keys())
    drafter, _ = load_edd(args.drafter, embed, head)
    drafter.eval()
    layer = [drafter.cfg.target_layer_id]
    records = D.load_records(D.record_target_states(target, answers, work / f"records_layer{layer[0]}", layer), layer)

    per_cat: dict[str, list[tuple[bool, bool, bool]]] = {}
    with torch.no_grad():
        for (cat, _), r in zip(pairs, records):
            tokens, p = r["tokens"][None], r["prompt_len"]
            out = drafter.forward_blocks(tokens, r["hidden"][None].float(), torch.arange(tokens.shape[1])[None])  # depth 0
            # slot q predicts x_{q+2}: the LM head only on the slots that predict answer tokens
            pred = drafter.logits(out[0, p - 2 :]).argmax(-1)
            per_cat.setdefault(cat, []).extend(copy_split(r["tokens"].tolist(), p, pred))
    vllm_pc = {}
    if args.vllm_json:
        run = json.loads(Path(args.vllm_json).read_text())["runs"][args.vllm_run]["per_category"]
        vllm_pc = {c.split("/", 1)[1]: v["acceptance_rate_per_pos"][0] for c, v in run.items() if "/" in c}
    rows = {}
    for cat, items in list(per_cat.items()) + [("overall", [x for v in per_cat.values() for x in v])]:
        copy = [x for x in items if x[1]]
        other = [x for x in items if not x[1]]
        rows[cat] = {
            "answer_tokens": len(items),
            "drafter_top1": sum(x[0] for x in items) / len(items),
            "copyable_fraction": len(copy) / len(items),
            "drafter_top1_copyable": sum(x[0] for x in copy) / max(len(copy), 1),
            "lookup_hit_copyable": sum(x[2] for x in copy) / max(len(copy), 1),
            "drafter_top1_other": sum(x[0] for x in other) / max(len(other), 1),
            "vllm_depth0_acceptance": vllm_pc.get(cat),
        }
    result = {"what": "offline depth-0 top-1 of the drafter on Spec-Bench answers, copyable vs other tokens",
              "target": "SmolLM2-135M-Instruct", "drafter": args.drafter, "prompts": len(pairs),
              "per_category": args.per_category, "max_tokens": args.max_tokens,
              "vllm_reference": {"json": args.vllm_json, "run": args.vllm_run} if args.vllm_json else None,
              "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    out = RESULTS / f"drafter_copy_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    for cat, r in rows.items():
        v = r["vllm_depth0_acceptance"]
        print(f"{cat:15s} top-1 {r['drafter_top1']:.3f}" + (f" (vLLM {v:.3f})" if v is not None else "")
              + f" | copyable {r['copyable_fraction']:.2f}: drafter {r['drafter_top1_copyable']:.3f}, lookup "
              f"{r['lookup_hit_copyable']:.3f} | other: drafter {r['drafter_top1_other']:.3f}")
    print(f"wrote {out}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = list(result["rows"])
    x = range(len(cats))
    series = [("drafter, copyable tokens", "drafter_top1_copyable"), ("prompt lookup, copyable tokens", "lookup_hit_copyable"),
              ("drafter, other tokens", "drafter_top1_other"), ("vLLM depth-0 acceptance (all tokens)", "vllm_depth0_acceptance")]
    fig, ax = plt.subplots(figsize=(10, 4))
    w = 0.2
    for i, (label, key) in enumerate(series):
        vals = [result["rows"][c][key] or 0.0 for c in cats]
        ax.bar([xi + (i - 1.5) * w for xi in x], vals, w, label=label)
    ax.set_xticks(list(x), cats, rotation=20)
    ax.set_ylabel("top-1 / hit rate at depth 0")
    ax.legend(fontsize=8)
    ax.set_title(f"{result['target']} drafter on Spec-Bench answers (offline, evaluation only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
