"""Acceptance and speed benchmark: methods compared in one run, on one machine.

  python benchmarks/bench_acceptance.py --prompts spec_bench --per-category 10 --batch-sizes 1 32 \
      --methods none ngram edd [eagle3=/path/to/eagle3-drafter]

Per method and category: vLLM's mean acceptance length (1 + accepted/drafts; it counts only steps that
drafted), acceptance per position, output tokens per target forward pass, output tokens/s, and speed-up
over no speculation measured in the same run. Writes benchmarks/results/acceptance_<tag>.json + .png.
Prompt sets: `spec_bench` (../shared/data), or any JSONL with `turns` or `question` fields.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def load_prompts(spec: str, per_category: int) -> list[tuple[str, str]]:
    """[(category, text)]; `spec_bench` or a JSONL path."""
    path = ROOT.parent / "shared/data/spec_bench_question.jsonl" if spec == "spec_bench" else Path(spec)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        text = (r.get("turns") or [r.get("question") or r.get("prompt")])[0]
        by_cat[r.get("category", path.stem)].append(text)
    return [(c, t) for c, texts in by_cat.items() for t in texts[:per_category]]


def method_config(name: str, k: int) -> dict | None:
    from vllm_specx.demo import BUNDLED_DRAFTER

    if name == "none":
        return None
    if name == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    if name == "edd":
        return {"method": "eagle3", "model": str(BUNDLED_DRAFTER), "num_speculative_tokens": k}
    if name.startswith(("edd=", "eagle3=")):
        return {"method": "eagle3", "model": name.split("=", 1)[1], "num_speculative_tokens": k}
    raise SystemExit(f"unknown method {name!r}")


def run_method(target: str, spec: dict | None, prompts: list[tuple[str, str]], batch: int, max_tokens: int):
    """Each method in a fresh spawned process: engines do not share state, and vLLM 0.32 crashes when an
    EAGLE-style engine starts in a process where the ngram proposer already imported numba/llvmlite."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_run_method, (target, spec, prompts, batch, max_tokens))


def _run_method(target: str, spec: dict | None, prompts: list[tuple[str, str]], batch: int, max_tokens: int):
    from vllm_specx.testing import generate, make_llm, shutdown

    llm = make_llm(target, spec, dtype=os.environ.get("SPECX_BENCH_DTYPE", "bfloat16"), max_model_len=2048,
                   max_num_seqs=max(batch, 1))
    per_cat: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    try:
        generate(llm, [prompts[0][1]], max_tokens=8)  # warm-up
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            res = generate(llm, [t for _, t in chunk], max_tokens=max_tokens, ignore_eos=False)
            # a batch mixes categories at batch > 1: its metrics go to every category in proportion
            share = {c: sum(1 for cc, _ in chunk if cc == c) / len(chunk) for c, _ in chunk}
            for c, f in share.items():
                d = per_cat[c]
                d["wall_s"] += res.wall_s * f
                d["output_tokens"] += sum(len(t) for (cc, _), t in zip(chunk, res.token_ids) if cc == c)
                d["drafts"] += res.metrics.num_drafts * f
                d["draft_tokens"] += res.metrics.num_draft_tokens * f
                d["accepted"] += res.metrics.num_accepted_tokens * f
                d["target_passes"] += res.metrics.num_engine_steps * f
                pp = res.metrics.accepted_per_pos
                d.setdefault("accepted_per_pos", [0.0] * len(pp))
                d["accepted_per_pos"] = [a + b * f for a, b in zip(d["accepted_per_pos"] or [0.0] * len(pp), pp)]
    finally:
        shutdown(llm)
    return {c: summarize(dict(d)) for c, d in per_cat.items()}  # plain dicts: picklable


def summarize(d: dict) -> dict:
    drafts = d.get("drafts", 0)
    out = dict(d)
    out["tokens_per_s"] = d["output_tokens"] / d["wall_s"] if d["wall_s"] else None
    out["tokens_per_target_pass"] = d["output_tokens"] / d["target_passes"] if d.get("target_passes") else None
    out["mean_acceptance_length"] = 1 + d.get("accepted", 0) / drafts if drafts else None
    out["acceptance_rate_per_pos"] = [a / drafts for a in d.get("accepted_per_pos", [])] if drafts else []
    return out


def overall(per_cat: dict) -> dict:
    keys = ("wall_s", "output_tokens", "drafts", "draft_tokens", "accepted", "target_passes")
    tot = {k: sum(v.get(k, 0) for v in per_cat.values()) for k in keys}
    pos = [sum(v.get("accepted_per_pos", [])[i] if i < len(v.get("accepted_per_pos", [])) else 0
               for v in per_cat.values()) for i in range(max(len(v.get("accepted_per_pos", [])) for v in per_cat.values()))]
    tot["accepted_per_pos"] = pos
    return summarize(tot)


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"host_cpu": cpu, "cores": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "torch": torch.__version__}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for batch in result["batch_sizes"]:
        names = [m for m in result["methods"]]
        sp = [runs[f"{m}@{batch}"]["overall"]["speedup"] for m in names]
        tpp = [runs[f"{m}@{batch}"]["overall"]["tokens_per_target_pass"] or 0 for m in names]
        x = range(len(names))
        off = 0.4 * result["batch_sizes"].index(batch)
        axes[0].bar([i + off for i in x], sp, width=0.4, label=f"batch {batch}")
        axes[1].bar([i + off for i in x], tpp, width=0.4, label=f"batch {batch}")
        axes[0].set_xticks(list(x), names)
        axes[1].set_xticks(list(x), names)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_title("speed-up over no speculation (wall time)")
    axes[1].set_title("output tokens per target forward pass")
    b1 = result["batch_sizes"][0]
    cats = sorted(runs[f"{result['methods'][0]}@{b1}"]["per_category"])
    for m in result["methods"]:
        if m == "none":
            continue
        pc = runs[f"{m}@{b1}"]["per_category"]
        axes[2].plot(cats, [pc[c]["mean_acceptance_length"] or 1 for c in cats], marker="o", label=m)
    axes[2].set_title(f"mean acceptance length per category (batch {b1})")
    axes[2].tick_params(axis="x", rotation=30)
    for ax in axes:
        ax.legend()
    fig.suptitle(f"{result['target']} on {result['machine']['host_cpu'] or result['machine']['gpu']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", default="spec_bench")
    ap.add_argument("--per-category", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["none", "ngram", "edd"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--tag", default="smollm2_cpu")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_specx.models import smollm2_path

    target = str(smollm2_path())
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [(c, tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False))
               for c, t in load_prompts(args.prompts, args.per_category)]
    result = {"target": "SmolLM2-135M-Instruct", "prompts": args.prompts, "num_prompts": len(prompts),
              "max_tokens": args.max_tokens, "k": args.k, "methods": args.methods, "batch_sizes": args.batch_sizes,
              "dtype": os.environ.get("SPECX_BENCH_DTYPE", "bfloat16"), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}}
    for batch in args.batch_sizes:
        for m in args.methods:
            per_cat = run_method(target, method_config(m, args.k), prompts, batch, args.max_tokens)
            result["runs"][f"{m}@{batch}"] = {"per_category": per_cat, "overall": overall(per_cat)}
            print(m, batch, json.dumps({k: v for k, v in result["runs"][f"{m}@{batch}"]["overall"].items()
                                        if k in ("tokens_per_s", "mean_acceptance_length", "tokens_per_target_pass")}))
        base = result["runs"][f"none@{batch}"]["overall"]["tokens_per_s"] if "none" in args.methods else None
        for m in args.methods:
            o = result["runs"][f"{m}@{batch}"]["overall"]
            o["speedup"] = o["tokens_per_s"] / base if base else None
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"acceptance_{args.tag}.json"
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
