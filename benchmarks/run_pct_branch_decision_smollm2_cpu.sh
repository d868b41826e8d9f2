#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_pct_branch_decision_smollm2_cpu_intel.{json,png} (issues:
# PCT trees, MCSD early stop in tree mode): the decision model estimating the children drafted under
# runner-up tokens (SPECX_BRANCH_DECISION=1, the default since session 15: it reads each expanded
# runner-up's draft step, like a chain step, and its estimate replaces the best child's draft confidence,
# so it stops branches whose estimate does not pay) against draft confidence for them (=0, session 14).
# As in run_pct_expand_smollm2_cpu.sh, one fixed node threshold (SPECX_NODE_THRESHOLD, chain and tree)
# stands in for a machine where verifying a node is cheap (this CPU's cost model keeps almost no
# runner-up). Batch 1, 24 Spec-Bench prompts, 64 tokens, the bundled drafter (max K 8, node budget 8).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=vllm_specx/assets/edd-smollm2-135m
# m NAME TREE THRESHOLD BRANCH_DECISION
m() { echo "$1={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"$2\", \"SPECX_NODE_THRESHOLD\": \"$3\", \"SPECX_EXPAND_CHILDREN\": \"2\", \"SPECX_BRANCH_DECISION\": \"$4\"}}"; }
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods none \
  "$(m chain_t0.1 0 0.1 1)" "$(m pct_t0.1_confidence 1 0.1 0)" "$(m pct_t0.1_decision 1 0.1 1)" \
  "$(m chain_t0.05 0 0.05 1)" "$(m pct_t0.05_confidence 1 0.05 0)" "$(m pct_t0.05_decision 1 0.05 1)" \
  "$(m fixed_tree_confidence 1 0 0)" "$(m fixed_tree_decision 1 0 1)" \
  --batch-sizes 1 --max-tokens 64 --k 5 --tag "${ACCEPTANCE_TAG:-pct_branch_decision_smollm2_cpu_intel}" "$@"
