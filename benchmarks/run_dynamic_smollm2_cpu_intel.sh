#!/usr/bin/env bash
# Session 11's rerun of the early-stop half of run_dynamic_smollm2_cpu.sh on the Intel machine, with the
# defaults of that session (payoff skipping + skip_forward on, lookup chains with the engine-wide ratio):
# fixed K in {3, 5, 8} (decision model off, hence no lookup either), the decision model without lookup
# chains (the MCSD comparison), and the bundled drafter as shipped. Writes
# benchmarks/results/acceptance_dynamic_smollm2_cpu_intel_b{1,32}.{json,png}.
set -euo pipefail
DYNAMIC_METHODS="none K3 K5 K8 early_stop_no_lookup early_stop" DYNAMIC_TAG=dynamic_smollm2_cpu_intel \
  exec bash "$(dirname "$0")/run_dynamic_smollm2_cpu.sh" "$@"
