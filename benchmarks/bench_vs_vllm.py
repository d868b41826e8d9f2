"""specx as shipped against vLLM's own speculative methods: one run, one machine, each method in its own process.

Wall time of one engine process varies by about 10 % from process to process on a shared 2-core machine, so
`--repeats R` runs every method R times, round-robin (none, ngram4, ..., specx, then again), and pools the
repeats (tokens/s = all output tokens / all wall time; token and pass counts are identical across greedy
repeats); each repeat's tokens/s is kept in `overall.tokens_per_s_repeats`.

  python benchmarks/bench_vs_vllm.py --batch-sizes 1 --tag b1_eager
  python benchmarks/bench_vs_vllm.py --batch-sizes 1 --compiled --tag b1_compiled
  python benchmarks/bench_vs_vllm.py --batch-sizes 32 --tag b32_eager
  (python benchmarks/bench.py vs-vllm-b1-eager ... runs the committed configurations)

Methods (--methods picks a subset):
  none     no speculation
  ngram4   vLLM `ngram`, k 4, lookup 2-4
  ngram8   vLLM `ngram`, k 8, lookup 2-4
  suffix   vLLM `suffix` (Arctic Inference's suffix decoding): runs in the interpreter of --suffix-python
           (a venv with arctic-inference, `scripts/install_suffix.sh`), whose plugin must not load into the
           project's venv; skipped, with the reason in the JSON, where that interpreter is missing
  eagle3   vLLM `eagle3` with the project's EAGLE-3 drafter (benchmarks/drafters/eagle3-smollm2-135m), chain K
  specx    the bundled EDD drafter with every shipped default (its specx_config.json: K, early stop, lookup
           candidates, SpecVocab head, cost model)
  specx_eagle3  eagle3's checkpoint with specx's parts (benchmarks/drafters/specx-eagle3-smollm2-135m, made by
           `vllm-specx attach`: early stop, lookup candidates, cost model; its specx_config.json's K)
Per method, prompt set and category: tokens/s and its ratio to `none` and to the best vLLM method of the run
(`vs_best_vllm`, per category against that category's best), output tokens per target pass, draft tokens
per pass, and the share of request steps that verified a draft (for specx split into the drafter's chains
and prompt-lookup chains). Schema as bench_acceptance.py writes it (`runs` -> "method@batch" -> `overall` /
`per_set` / `per_category`), in benchmarks/results/vs_vllm_<tag>.{json,png}, with the command and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_acceptance import (  # noqa: E402
    ROOT, _write, chat_prompts, machine, overall, packages, run_method)

EAGLE3_DRAFTER = ROOT / "benchmarks" / "drafters" / "eagle3-smollm2-135m"
# the same EAGLE-3 weights with specx's parts (`vllm-specx attach`; its decision model and lookup table)
SPECX_EAGLE3_DRAFTER = ROOT / "benchmarks" / "drafters" / "specx-eagle3-smollm2-135m"
VLLM_METHODS = ("ngram4", "ngram8", "suffix", "eagle3")
ALL_METHODS = ("none", *VLLM_METHODS, "specx", "specx_eagle3")
PROMPT_SETS = ["spec_bench", "mt_bench", "humaneval", "gsm8k"]


def method_spec(name: str, eagle3_k: int) -> dict | None:
    """The speculative config of one method (None: no speculation)."""
    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.demo import BUNDLED_DRAFTER

    if name == "none":
        return None
    if name in ("ngram4", "ngram8"):
        return {"method": "ngram", "num_speculative_tokens": int(name[5:]), "prompt_lookup_min": 2,
                "prompt_lookup_max": 4}
    if name == "suffix":
        return {"method": "suffix"}
    if name == "eagle3":
        return {"method": "eagle3", "model": str(EAGLE3_DRAFTER), "num_speculative_tokens": eagle3_k}
    if name in ("specx", "specx_eagle3"):
        folder = BUNDLED_DRAFTER if name == "specx" else SPECX_EAGLE3_DRAFTER
        k = load_specx_config(folder).num_speculative_tokens
        return {"method": "eagle3", "model": str(folder), "num_speculative_tokens": k}
    raise SystemExit(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)}")


def distinct_prompts(sets: list[str], per_category: int) -> list[tuple[str, str]]:
    """[("set/category", text)], per_category evenly spread prompts of each set's categories, none repeated:
    Spec-Bench's multi-turn category is MT-Bench's questions, and a repeated prompt would hand a method that
    caches earlier outputs (suffix decoding's global tree) the answer it generated before."""
    from vllm_specx.eval_sets import load_prompt_set

    seen: set[str] = set()
    out = []
    for spec in sets:
        by_cat: dict[str, list[str]] = {}
        for cat, text in load_prompt_set(spec):
            if text not in seen:
                by_cat.setdefault(cat, []).append(text)
        for cat, texts in by_cat.items():
            picked = [texts[(i * len(texts)) // per_category] for i in range(min(per_category, len(texts)))]
            seen.update(picked)
            out += [(spec if cat == spec else f"{spec}/{cat}", t) for t in picked]
    return out


def pooled_run(repeats: list[tuple[dict, dict]], batch: int) -> dict:
    """One method's repeats [(per_cat, counters)] pooled into one run: each category's repeats summed and
    re-summarised (`overall` over them), specx's counters summed; overall.tokens_per_s_repeats holds each
    repeat's tok/s."""
    per_cat = {cat: overall({i: pc[cat] for i, (pc, _) in enumerate(repeats)}) for cat in repeats[0][0]}
    counters = {k: sum(c.get(k, 0.0) for _, c in repeats) for k in repeats[0][1]}
    sets = sorted({c.split("/")[0] for c in per_cat})
    run = {"per_category": per_cat, "overall": overall(per_cat),
           "per_set": {s: overall({c: v for c, v in per_cat.items() if c.split("/")[0] == s}) for s in sets},
           "specx_counters": counters}
    run["overall"]["tokens_per_s_repeats"] = [overall(pc)["tokens_per_s"] for pc, _ in repeats]
    step_shares(run["overall"], counters, batch)
    return run


def step_shares(o: dict, counters: dict, batch: int) -> None:
    """Adds to an overall/per-set dict the share of request steps that verified a draft: vLLM counts a
    draft per request step that proposed one; specx's counters split those into drafter and lookup chains.
    Request steps: the engine's steps at batch 1 (exact), else output - accepted tokens (vLLM counts
    accepted drafts past a request's max_tokens too, so this undercounts a little)."""
    passes = (o.get("target_passes") if batch == 1 else o.get("request_passes")) or 0
    o["drafted_step_share"] = o.get("drafts", 0) / passes if passes > 0 else None
    if "specx:drafter_chains_total" in counters or "specx:lookup_chains_total" in counters:
        drafter = counters.get("specx:drafter_chains_total", 0.0)
        lookup = counters.get("specx:lookup_chains_total", 0.0)
        o["drafter_chain_steps"], o["lookup_chain_steps"] = drafter, lookup
        # the drafter drafted in this share of the request steps where no lookup chain was chosen
        o["drafter_share_without_lookup"] = drafter / (passes - lookup) if passes > lookup else None


def add_ratios(result: dict, batch: int, methods: list[str]) -> None:
    """speedup (vs none) and vs_best_vllm (vs the fastest vLLM method of the run) for every figure set:
    overall, each prompt set, each category (each against its own best)."""
    runs = {m: result["runs"][f"{m}@{batch}"] for m in methods if f"{m}@{batch}" in result["runs"]}
    vllm = [m for m in runs if m in VLLM_METHODS]

    def tps(run: dict, level: str, key: str | None) -> float | None:
        o = run[level] if key is None else run[level].get(key)
        return o.get("tokens_per_s") if o else None

    for level in ("overall", "per_set", "per_category"):
        keys = [None] if level == "overall" else sorted({k for r in runs.values() for k in r[level]})
        for key in keys:
            base = tps(runs["none"], level, key) if "none" in runs else None
            best_m = max(vllm, key=lambda m: tps(runs[m], level, key) or 0.0, default=None)
            best = tps(runs[best_m], level, key) if best_m else None
            for run in runs.values():
                o = run[level] if key is None else run[level].get(key)
                if o is None or not o.get("tokens_per_s"):
                    continue
                o["speedup"] = o["tokens_per_s"] / base if base else None
                o["vs_best_vllm"] = o["tokens_per_s"] / best if best else None
                o["best_vllm_method"] = best_m


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", nargs="+", default=PROMPT_SETS)
    ap.add_argument("--per-category", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--eagle3-k", type=int, default=3, help="vLLM eagle3's chain length")
    ap.add_argument("--compiled", action="store_true", help="compiled target (enforce_eager=False); default eager")
    ap.add_argument("--suffix-python", default=str(ROOT / ".venv-suffix" / "bin" / "python"),
                    help="interpreter of a venv with arctic-inference (scripts/install_suffix.sh)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method, round-robin, pooled (see above)")
    ap.add_argument("--tag", default="b1_eager")
    ap.add_argument("--prefix", default="vs_vllm", help="results/<prefix>_<tag>.json")
    args = ap.parse_args()

    from vllm_specx.models import smollm2_path

    kwargs = json.loads(os.environ.get("SPECX_LLM_KWARGS", "{}"))
    kwargs["enforce_eager"] = not args.compiled
    os.environ["SPECX_LLM_KWARGS"] = json.dumps(kwargs)  # every method's engine (make_llm reads it)
    target = str(smollm2_path())
    prompts = chat_prompts(target, distinct_prompts(args.prompts, args.per_category))
    specs = {m: method_spec(m, args.eagle3_k) for m in args.methods}
    result = {"what": "specx as shipped vs vLLM's own speculative methods", "target": "SmolLM2-135M-Instruct",
              "prompts": args.prompts, "per_category": args.per_category, "num_prompts": len(prompts),
              "max_tokens": args.max_tokens, "methods": list(specs), "batch_sizes": args.batch_sizes,
              "dtype": os.environ.get("SPECX_BENCH_DTYPE", "float32"), "compiled": args.compiled,
              "speculative_configs": specs, "machine": machine(), "packages": packages(),
              "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": {}, "skipped": {}}
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    result["repeats"] = args.repeats
    done: dict[str, list[tuple[dict, dict]]] = {}  # "method@batch" -> [(per_cat, counters)] per repeat
    for rep in range(args.repeats):
        for batch in args.batch_sizes:
            for m, spec in specs.items():
                python = None
                if m == "suffix":
                    if not Path(args.suffix_python).exists():
                        result["skipped"][m] = f"{args.suffix_python} not found (bash scripts/install_suffix.sh makes it)"
                        continue
                    python = args.suffix_python
                per_cat, _, counters = run_method(target, spec, prompts, batch, args.max_tokens, python=python)
                done.setdefault(f"{m}@{batch}", []).append((per_cat, counters))
                run = pooled_run(done[f"{m}@{batch}"], batch)
                result["runs"][f"{m}@{batch}"] = run
                add_ratios(result, batch, list(specs))
                _write(result, args.tag, args.prefix)  # partial results survive an interrupted run
                o = run["overall"]
                print(f"[repeat {rep + 1}/{args.repeats}] {m}@{batch}: {o['tokens_per_s_repeats'][-1]:.2f} tok/s "
                      f"(pooled {o['tokens_per_s']:.2f}), {o['tokens_per_target_pass']:.3f} tokens/pass, "
                      f"x{o.get('speedup') or float('nan'):.3f} none", flush=True)
    out = _write(result, args.tag, args.prefix)
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"wrote {out}")


def table(result: dict) -> str:
    """Markdown: per method and batch size, overall tok/s, x none, x best vLLM method, tokens per pass."""
    rows = ["| method | batch | tok/s | tok/s per repeat | x none | x best vLLM | tokens per target pass (per request) "
            "| drafted steps |", "|---|---|---|---|---|---|---|---|"]
    for key, run in result["runs"].items():
        o = run["overall"]
        m, b = key.split("@")
        per_pass = o.get("tokens_per_target_pass" if b == "1" else "tokens_per_request_pass")
        reps = " / ".join(f"{x:.1f}" for x in o.get("tokens_per_s_repeats", [o["tokens_per_s"]]))
        rows.append(f"| {m} | {b} | {o['tokens_per_s']:.1f} | {reps} | {_f(o.get('speedup'))} | {_f(o.get('vs_best_vllm'))} "
                    f"| {_f(per_pass, 3)} | {_f(o.get('drafted_step_share'), 2)} |")
    return "\n".join(rows)


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = result["batch_sizes"]
    fig, axes = plt.subplots(len(batches), 2, figsize=(16, 4.5 * len(batches)), squeeze=False)
    for row, batch in zip(axes, batches):
        methods = [m for m in result["methods"] if f"{m}@{batch}" in result["runs"]]
        runs = {m: result["runs"][f"{m}@{batch}"] for m in methods}
        cats = sorted(runs[methods[0]]["per_category"])
        width = 0.8 / max(len(methods) - 1, 1)
        for i, m in enumerate(mm for mm in methods if mm != "none"):
            pc = runs[m]["per_category"]
            row[0].bar([c + i * width for c in range(len(cats))], [pc[c].get("speedup") or 0 for c in cats],
                       width=width, label=m)
            per_pass = "tokens_per_target_pass" if batch == 1 else "tokens_per_request_pass"
            row[1].bar([c + i * width for c in range(len(cats))], [pc[c].get(per_pass) or 0 for c in cats],
                       width=width, label=m)
        for ax, title in zip(row, ("speed-up over no speculation (wall time)", "output tokens per target pass")):
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xticks([c + 0.4 for c in range(len(cats))], cats, rotation=30, ha="right")
            ax.set_title(f"{title}, batch {batch}")
            ax.legend(fontsize=8)
    mode = "compiled" if result["compiled"] else "eager"
    fig.suptitle(f"{result['target']} ({result['dtype']}, {mode}) on {result['machine']['host_cpu']}, "
                 f"{result['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
