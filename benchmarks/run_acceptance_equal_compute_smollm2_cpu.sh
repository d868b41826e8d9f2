#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_equal_compute_smollm2_cpu_intel.{json,png}: the EDD drafter
# whose training took about the EAGLE-3 baseline's wall time (504 steps, 41 min vs 210 steps, 38 min, on
# the same session-2 records and the same 2-core AMD machine; EAGLE-3's training-time-test unroll costs
# ~2.2x EDD's step), restored byte for byte from commit ca61d1b (the bundled drafter of session 6).
# Same prompts, K and settings as run_acceptance_equal_budget_smollm2_cpu.sh (fixed chain K = 5, no early
# stop, no lookup, full-vocabulary head like the baseline's), batch 1 only: greedy acceptance is
# deterministic, so its mean accepted length compares with that run's eagle3 row (its speed does not:
# speed is compared only within one run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
$PY benchmarks/bench_acceptance.py \
  --prompts spec_bench mt_bench humaneval --per-category 8 \
  --methods 'edd_504={"method": "eagle3", "model": "benchmarks/drafters/edd-smollm2-135m-504steps", "num_speculative_tokens": 5, "env": {"SPECX_EARLY_STOP": "0", "SPECX_LOOKUP": "0", "SPECX_VOCAB": "full"}}' \
  --batch-sizes 1 --max-tokens 128 --k 5 --tag "${ACCEPTANCE_TAG:-equal_compute_smollm2_cpu_intel}" "$@"
