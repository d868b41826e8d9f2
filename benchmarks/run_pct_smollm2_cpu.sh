#!/usr/bin/env bash
# The run behind benchmarks/results/acceptance_pct_smollm2_cpu.{json,png} (issue: PCT trees): one run,
# batch 1, 8 and 32, same prompts, each method against its own `none` in the same run:
#   chain EDD   the bundled drafter's early-stop chain (max K 8; its PCT trees off),
#   PCT         the same chain + runner-up children kept by expected gain (cost-model thresholds,
#               node budget 8),
#   fixed tree  the same 8-node budget with every threshold 0 (the best 8 nodes by path probability,
#               EAGLE-2 style: no cost pruning),
#   eagle3      vLLM's own eagle3 method with the equal-budget EAGLE-3 baseline drafter (K 5).
# Results committed before session 14 were measured with runner-ups as leaves (no expansion below them),
# which is SPECX_EXPAND_CHILDREN=0 now; benchmarks/run_pct_expand_smollm2_cpu.sh compares the two.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=vllm_specx/assets/edd-smollm2-135m
METHODS=(
  none
  "chain_edd={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"0\"}}"
  "pct={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"1\"}}"
  "fixed_tree={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"1\", \"SPECX_NODE_THRESHOLD\": \"0\"}}"
  "eagle3=benchmarks/drafters/eagle3-smollm2-135m"
)
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods "${METHODS[@]}" \
  --batch-sizes 1 8 32 --max-tokens 64 --k 5 --tag pct_smollm2_cpu "$@"
