#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_pct_expand_smollm2_cpu_intel.{json,png} (issue: PCT trees):
# what drafting children under runner-up tokens (one extra drafter pass after the chain loop, session 14;
# SPECX_EXPAND_CHILDREN, default 2 children per expanded runner-up) adds to the tree, against the same
# trees with runner-ups as leaves (SPECX_EXPAND_CHILDREN=0, the behaviour of every earlier PCT result).
# As in run_pct_threshold_smollm2_cpu.sh, one fixed node threshold (SPECX_NODE_THRESHOLD, the same for
# chain and tree) stands in for the lower threshold of a machine where verifying a node is cheap; the
# cost model's own threshold on this CPU keeps almost no runner-up (results/acceptance_pct_smollm2_cpu_intel_s13).
# Batch 1, 24 Spec-Bench prompts, 64 tokens, the bundled drafter (max K 8, node budget 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=vllm_specx/assets/edd-smollm2-135m
# m NAME TREE THRESHOLD CHILDREN
m() { echo "$1={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"$2\", \"SPECX_NODE_THRESHOLD\": \"$3\", \"SPECX_EXPAND_CHILDREN\": \"$4\"}}"; }
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods none \
  "$(m chain_t0.1 0 0.1 0)" "$(m pct_t0.1_leaves 1 0.1 0)" "$(m pct_t0.1 1 0.1 2)" \
  "$(m chain_t0.05 0 0.05 0)" "$(m pct_t0.05_leaves 1 0.05 0)" "$(m pct_t0.05 1 0.05 2)" \
  "$(m fixed_tree_leaves 1 0 0)" "$(m fixed_tree 1 0 2)" \
  --batch-sizes 1 --max-tokens 64 --k 5 --tag "${ACCEPTANCE_TAG:-pct_expand_smollm2_cpu_intel}" "$@"
