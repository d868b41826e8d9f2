#!/usr/bin/env bash
# Issue #3's equal-budget comparison repeated on a training mix closer to Spec-Bench's kinds of task
# (session 23): EDD and the EAGLE-3 baseline trained by `vllm-specx train` from the same new records with
# the same batches, block boundaries, loss, optimiser and number of steps (see README, "Session 23: the
# equal-budget pair again" and "Session 24: the same pair at 504 equal steps"); both draft a fixed chain
# of K = 5 with nothing else on (no early stop, no lookup), as in run_acceptance_equal_budget_smollm2_cpu.sh.
# Drafters (not committed: 9-14 MB each; the README gives the commands that rebuild them): $EDD_MIXED and
# $EAGLE3_MIXED.
# -> benchmarks/results/acceptance_${ACCEPTANCE_TAG:-equal_budget_mixed_smollm2_cpu_intel}.{json,png}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
EDD=${EDD_MIXED:?path of the EDD drafter trained on the mixed records}
EAGLE3=${EAGLE3_MIXED:?path of the EAGLE-3 baseline trained on the mixed records}
PLAIN='"env": {"SPECX_EARLY_STOP": "0", "SPECX_LOOKUP": "0"}'
$PY benchmarks/bench_acceptance.py \
  --prompts spec_bench mt_bench humaneval --per-category 8 \
  --methods none \
  "eagle3_mixed={\"method\": \"eagle3\", \"model\": \"$EAGLE3\", \"num_speculative_tokens\": 5}" \
  "edd_mixed={\"method\": \"eagle3\", \"model\": \"$EDD\", \"num_speculative_tokens\": 5, $PLAIN}" \
  --batch-sizes 1 --max-tokens 128 --k 5 --tag "${ACCEPTANCE_TAG:-equal_budget_mixed_smollm2_cpu_intel}" "$@"
