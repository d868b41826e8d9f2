#!/usr/bin/env bash
# The run behind benchmarks/results/serve_smollm2_cpu.{json,png} (serving issue): `vllm serve` (through
# `vllm-specx serve`) with SmolLM2-135M-Instruct, without speculation and with the bundled EDD drafter
# (early stop + this machine's cost model), streaming greedy chat requests at 1, 8, 32 and 64 in flight.
set -euo pipefail
# The committed run (session 5) had whole-step payoff skipping on (opt-in then, the default since session 11)
export SPECX_STEP_PAYOFF=${SPECX_STEP_PAYOFF:-1}
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
$PY benchmarks/bench_serve_load.py --methods none \
  "edd={\"method\": \"eagle3\", \"model\": \"vllm_specx/assets/edd-smollm2-135m\", \"num_speculative_tokens\": 8}" \
  --concurrency 1 8 32 64 --min-requests 8 --max-tokens 64 --tag smollm2_cpu "$@"
