#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_smollm2_cpu.{json,png} (issue: EDD vs vLLM's methods).
# Drafters: the bundled EDD drafter and the EAGLE-3 baseline trained on the same records with the same
# budget (benchmarks/drafters/eagle3-smollm2-135m); both built by `vllm-specx train` (see README).
# Both at fixed K = 5 (SPECX_EARLY_STOP=0: the bundled drafter's early-stop model is compared elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
$PY benchmarks/bench_acceptance.py \
  --prompts spec_bench mt_bench humaneval --per-category 4 \
  --methods none ngram eagle3=benchmarks/drafters/eagle3-smollm2-135m \
  'edd={"method": "eagle3", "model": "vllm_specx/assets/edd-smollm2-135m", "num_speculative_tokens": 5, "env": {"SPECX_EARLY_STOP": "0"}}' \
  --batch-sizes 1 32 --max-tokens 128 --k 5 --tag smollm2_cpu "$@"
