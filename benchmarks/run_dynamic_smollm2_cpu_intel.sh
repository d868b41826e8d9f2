#!/usr/bin/env bash
# Session 11's rerun of the early-stop half of run_dynamic_smollm2_cpu.sh on the Intel machine, with the
# defaults of that session (payoff skipping + skip_forward on, lookup chains with the engine-wide ratio):
# fixed K in {3, 5, 8} (decision model off, hence no lookup either), the decision model without lookup
# chains (the MCSD comparison), and the bundled drafter as shipped. Writes
# benchmarks/results/acceptance_dynamic_smollm2_cpu_intel_b{1,32}.{json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D=vllm_specx/assets/edd-smollm2-135m
OFF='"env": {"SPECX_EARLY_STOP": "0"}'
METHODS=(
  none
  "K3={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 3, $OFF}"
  "K5={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 5, $OFF}"
  "K8={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, $OFF}"
  "early_stop_no_lookup={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8, \"env\": {\"SPECX_LOOKUP\": \"0\"}}"
  "early_stop={\"method\": \"eagle3\", \"model\": \"$D\", \"num_speculative_tokens\": 8}"
)
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 4 --methods "${METHODS[@]}" \
  --batch-sizes 1 --max-tokens 64 --tag dynamic_smollm2_cpu_intel_b1
$PY benchmarks/bench_acceptance.py --prompts spec_bench --per-category 6 --methods "${METHODS[@]}" \
  --batch-sizes 32 --max-tokens 64 --tag dynamic_smollm2_cpu_intel_b32
