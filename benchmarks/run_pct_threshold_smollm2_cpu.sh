#!/usr/bin/env bash
# What-if behind benchmarks/results/acceptance_pct_threshold_smollm2_cpu_intel.{json,png} (issue: PCT
# trees): chain vs PCT when a verified node is cheap. On this CPU the cost model's node threshold keeps
# almost no runner-up (results/acceptance_pct_smollm2_cpu_intel_s13); here one fixed node threshold
# (SPECX_NODE_THRESHOLD, the same for chain and tree, no cost model, no whole-step payoff) stands in for
# the lower threshold a machine with cheap verification (a GPU at small batch) would compute. Wall time
# is then not the point (these thresholds do not pay on this CPU); acceptance and nodes per pass are.
# Batch 1, 24 Spec-Bench prompts, 64 tokens, the bundled drafter (max K 8, node budget 8).
# Results committed before session 14 were measured with runner-ups as leaves (no expansion below them),
# which is SPECX_EXPAND_CHILDREN=0 now; benchmarks/run_pct_expand_smollm2_cpu.sh compares the two.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=vllm_specx/assets/edd-smollm2-135m
m() { echo "$1={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"$2\", \"SPECX_NODE_THRESHOLD\": \"$3\"}}"; }
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods none \
  "$(m chain_t0.1 0 0.1)" "$(m pct_t0.1 1 0.1)" "$(m chain_t0.05 0 0.05)" "$(m pct_t0.05 1 0.05)" \
  "$(m fixed_tree 1 0)" \
  --batch-sizes 1 --max-tokens 64 --k 5 --tag "${ACCEPTANCE_TAG:-pct_threshold_smollm2_cpu_intel}" "$@"
