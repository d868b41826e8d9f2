#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_equal_budget_smollm2_cpu_intel.{json,png} (issue: EDD vs
# vLLM's methods, EDD's mean accepted length vs the equal-budget EAGLE-3 baseline).
# Drafters, all built by `vllm-specx train` from the same session-2 records (see README):
#   benchmarks/drafters/edd-smollm2-135m-210steps  EDD, 210 optimiser steps (the bundled drafter until
#                                                  session 6; restored byte for byte from commit 30a8649)
#   benchmarks/drafters/eagle3-smollm2-135m        EAGLE-3, the same 210 steps on the same batches
#   vllm_specx/assets/edd-smollm2-135m             the bundled EDD drafter (769 steps, more data; its
#                                                  SpecVocab head as shipped, the others' heads are full)
# eagle3 / edd_equal / edd_bundled_k5 draft a fixed chain of K = 5 with nothing else on (no early stop,
# no prompt lookup): the drafters alone. edd_shipped is the bundled drafter as shipped (early stop,
# lookup candidates, SpecVocab head; max K 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
PLAIN='"env": {"SPECX_EARLY_STOP": "0", "SPECX_LOOKUP": "0"}'
$PY benchmarks/bench_acceptance.py \
  --prompts spec_bench mt_bench humaneval --per-category 8 \
  --methods none ngram \
  "eagle3={\"method\": \"eagle3\", \"model\": \"benchmarks/drafters/eagle3-smollm2-135m\", \"num_speculative_tokens\": 5}" \
  "edd_equal={\"method\": \"eagle3\", \"model\": \"benchmarks/drafters/edd-smollm2-135m-210steps\", \"num_speculative_tokens\": 5, $PLAIN}" \
  "edd_bundled_k5={\"method\": \"eagle3\", \"model\": \"vllm_specx/assets/edd-smollm2-135m\", \"num_speculative_tokens\": 5, $PLAIN}" \
  'edd_shipped={"method": "eagle3", "model": "vllm_specx/assets/edd-smollm2-135m", "num_speculative_tokens": 8}' \
  --batch-sizes 1 32 --max-tokens 128 --k 5 --tag "${ACCEPTANCE_TAG:-equal_budget_smollm2_cpu_intel}" "$@"
