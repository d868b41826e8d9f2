"""Plain decoding speed of Gemma-3-270M in vLLM at batch 1 under each model implementation that a specx
drafter could read hidden states from: vLLM's native Gemma3ForCausalLM (no EAGLE-3 auxiliary hidden states:
the baseline), specx's SupportsEagle3 subclass (SpecxGemma3ForCausalLM) and vLLM's Transformers modeling
backend (model_impl="transformers"). One process per implementation; a warm-up request, then each prompt
alone (batch 1) for --max-tokens tokens; tok/s = generated tokens / wall time of those requests (the
fastest of --repeats passes). Eager, fp32 by default (the harness's make_llm defaults).

  python benchmarks/bench_gemma3_impl.py [--max-tokens 32] [--dtype float32] [--rounds 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
IMPLS = {
    "native": {},
    "specx_class": {"hf_overrides": {"architectures": ["SpecxGemma3ForCausalLM"]}},
    "transformers_backend": {"model_impl": "transformers"},
}


def one(impl: str, max_tokens: int, dtype: str, repeats: int = 1) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    from vllm_specx.models import gemma3_path
    from vllm_specx.testing import make_llm, shutdown

    t0 = time.perf_counter()
    llm = make_llm(str(gemma3_path()), dtype=dtype, **IMPLS[impl])
    start_s = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate(["Hello"], params, use_tqdm=False)  # warm-up
    walls = []
    for _ in range(repeats):
        tokens, outs, t0 = 0, [], time.perf_counter()
        for p in PROMPTS:
            out = llm.generate([p], params, use_tqdm=False)[0].outputs[0]
            tokens += len(out.token_ids)
            outs.append(list(out.token_ids))
        walls.append(time.perf_counter() - t0)
    shutdown(llm)
    wall = min(walls)  # the pass least disturbed by other load on the machine
    return {"impl": impl, "tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "walls_s": walls,
            "start_s": start_s, "token_ids": outs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=1,
                    help="processes per implementation, in order A B C then C B A ... (evens out a drifting load)")
    ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts per process; the fastest counts")
    ap.add_argument("--impl", choices=list(IMPLS), default=None, help="(internal) run one implementation")
    args = ap.parse_args()
    if args.impl:
        print("RESULT " + json.dumps(one(args.impl, args.max_tokens, args.dtype, args.repeats)))
        return
    results = []
    order = [impl for r in range(args.rounds) for impl in (list(IMPLS) if r % 2 == 0 else list(IMPLS)[::-1])]
    for impl in order:
        proc = subprocess.run([sys.executable, __file__, "--impl", impl, "--max-tokens", str(args.max_tokens),
                               "--dtype", args.dtype, "--repeats", str(args.repeats)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{impl}: failed\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(line[len("RESULT "):]))
    same = all(r["token_ids"] == results[0]["token_ids"] for r in results)
    for r in sorted(results, key=lambda r: list(IMPLS).index(r["impl"])):
        print(f"{r['impl']:22s} {r['tok_s']:7.1f} tok/s  ({r['tokens']} tokens in {r['wall_s']:.2f} s; passes "
              f"{', '.join(f'{w:.2f}' for w in r['walls_s'])} s; engine start {r['start_s']:.1f} s)")
    print(f"identical greedy tokens across implementations: {same}")


if __name__ == "__main__":
    main()
