#!/usr/bin/env bash
# The runs behind benchmarks/results/serve_smollm2_cpu_intel_c64_{s16,stream_s16}.{json,png} (serving issue,
# session 16): `vllm serve` (through `vllm-specx serve`) with SmolLM2-135M-Instruct at 64 in flight, without
# speculation, with the bundled EDD drafter as shipped, and with early_stop.skip_prefill on
# (SPECX_SKIP_PREFILL=1: steps that do not pay skip the drafter's pass over new prompts; those requests
# become drafter-blind). Servers interleaved per repetition; ratios are to the none server of the same one.
#   burst:  64 requests at once (one wave, as in sessions 11-12), 3 repetitions
#   stream: 192 requests, 64 kept in flight (new prompts keep arriving), 2 repetitions
#   iomp:   burst, none and EDD only, 1 repetition, both servers with Intel OpenMP preloaded (vLLM-CPU's advice)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
EDD='{"method": "eagle3", "model": "vllm_specx/assets/edd-smollm2-135m", "num_speculative_tokens": 8}'
BLIND='{"method": "eagle3", "model": "vllm_specx/assets/edd-smollm2-135m", "num_speculative_tokens": 8, "env": {"SPECX_SKIP_PREFILL": "1"}}'
mode=${1:-burst}
if [ "$mode" = burst ]; then
  $PY benchmarks/bench_serve_load.py --methods none "edd=$EDD" "edd_skip_prefill=$BLIND" \
    --concurrency 64 --min-requests 8 --max-tokens 64 --reps 3 --tag smollm2_cpu_intel_c64_s16
elif [ "$mode" = iomp ]; then
  LD_PRELOAD="$(dirname "$(readlink -f "$PY")")/../lib/libiomp5.so" $PY benchmarks/bench_serve_load.py --methods none \
    "edd=$EDD" --concurrency 64 --min-requests 8 --max-tokens 64 --reps 1 --tag smollm2_cpu_intel_c64_iomp_s16
else
  $PY benchmarks/bench_serve_load.py --methods none "edd=$EDD" "edd_skip_prefill=$BLIND" \
    --concurrency 64 --min-requests 192 --max-tokens 64 --reps 2 --tag smollm2_cpu_intel_c64_stream_s16
fi
