#!/usr/bin/env bash
# The runs behind benchmarks/results/acceptance_dynamic_smollm2_cpu_b{1,32}.{json,png} (MCSD early stop and
# PCT trees): the bundled EDD drafter at fixed K in {3, 5, 8}; vLLM's own dynamic option, the
# per-batch-size length table (vLLM 0.32 has no online acceptance estimator for eagle3: its adaptive
# verification is dspark-only); the decision model (early stop, max K 8, node threshold from the cost model
# this machine measured with `vllm-specx calibrate`); PCT trees on top of it (chain + runner-up children
# kept by expected gain, node budget 8); and a fixed tree with the same budget (no cost pruning: every
# node threshold 0, the best 8 nodes by path probability, EAGLE-2 style).
# Same drafter weights everywhere; SPECX_EARLY_STOP=0 switches the decision model off (and with it the
# lookup chains); early_stop_no_lookup (SPECX_LOOKUP=0) is the decision model alone, not in the default run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=vllm_specx/assets/edd-smollm2-135m
OFF='"env": {"SPECX_EARLY_STOP": "0"}'
declare -A DEFINED=(
  [none]=none
  [K3]="K3={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 3, $OFF}"
  [K5]="K5={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 5, $OFF}"
  [K8]="K8={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, $OFF}"
  [vllm_table]="vllm_table={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 5, \"num_speculative_tokens_per_batch_size\": [[1, 1, 5], [2, 16, 3], [17, 256, 1]], $OFF}"
  [early_stop]="early_stop={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8}"
  [early_stop_no_lookup]="early_stop_no_lookup={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_LOOKUP\": \"0\"}}"
  [pct]="pct={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"1\"}}"
  [fixed_tree]="fixed_tree={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_TREE\": \"1\", \"SPECX_NODE_THRESHOLD\": \"0\"}}"
)
# DYNAMIC_METHODS (labels above, in run order) and DYNAMIC_TAG select another run of the same benchmark
# (run_dynamic_smollm2_cpu_intel.sh); the defaults are the committed run's.
METHODS=()
for label in ${DYNAMIC_METHODS:-none K3 K5 K8 vllm_table early_stop pct fixed_tree}; do
  METHODS+=("${DEFINED[$label]:?unknown method label $label}")
done
TAG=${DYNAMIC_TAG:-dynamic_smollm2_cpu}
# batch 1 on 24 prompts, batch 32 on 36 prompts (two runs; each compares its methods against its own `none`)
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods "${METHODS[@]}" \
  --batch-sizes 1 --max-tokens 64 --tag "${TAG}_b1" "$@"
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 6 --methods "${METHODS[@]}" \
  --batch-sizes 32 --max-tokens 64 --tag "${TAG}_b32" "$@"
