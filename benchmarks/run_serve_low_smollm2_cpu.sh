#!/usr/bin/env bash
# The run behind benchmarks/results/serve_smollm2_cpu_intel_low_s17.{json,png} (serving issue, session 17):
# `vllm serve` (through `vllm-specx serve`) with SmolLM2-135M-Instruct at 1, 8 and 32 in flight, without
# speculation and with the bundled EDD drafter as shipped; 24 requests per level (32 at 32), Spec-Bench
# prompts round-robin over the six categories, up to 64 tokens, 2 repetitions, servers interleaved.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
$PY benchmarks/bench_serve_load.py --methods none \
  'edd={"method": "eagle3", "model": "vllm_specx/assets/edd-smollm2-135m", "num_speculative_tokens": 8}' \
  --concurrency 1 8 32 --min-requests 24 --max-tokens 64 --reps 2 --interleave --tag smollm2_cpu_intel_low_s17
