#!/usr/bin/env bash
# The runs behind benchmarks/results/serve_smollm2_cpu_intel_c64_{stream,distinct}_s17.{json,png} (serving
# issue, session 17): `vllm serve` (through `vllm-specx serve`) with SmolLM2-135M-Instruct, 192 Spec-Bench
# chat requests with 64 kept in flight. Servers interleaved per repetition; ratios are to the none server
# of the same repetition.
#   stream:   72 distinct prompts (as in session 16), so later requests hit the prefix cache; without
#             speculation, with the bundled EDD drafter as shipped (keeps the last block of prefix-cache
#             hits: vllm_adapter/prefix_cache.py), with vLLM's EAGLE block drop restored for it
#             (SPECX_EAGLE_BLOCK_DROP=1: sessions 11-16 ran this way), and with early_stop.skip_prefill on
#   distinct: 192 distinct prompts (no prefix reuse beyond the chat template): none, EDD, EDD + skip_prefill
#   reps:     as stream, none and EDD as shipped only, 3 more repetitions (..._c64_stream_reps_s17)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
D='"method": "eagle3", "model": "vllm_specx/assets/edd-smollm2-135m", "num_speculative_tokens": 8'
COMMON=(--concurrency 64 --min-requests 192 --max-tokens 64 --reps 2)
if [ "${1:-stream}" = stream ]; then
  $PY benchmarks/bench_serve_load.py --methods none "edd={$D}" \
    "edd_block_drop={$D, \"env\": {\"SPECX_EAGLE_BLOCK_DROP\": \"1\"}}" \
    "edd_skip_prefill={$D, \"env\": {\"SPECX_SKIP_PREFILL\": \"1\"}}" "${COMMON[@]}" --tag smollm2_cpu_intel_c64_stream_s17
elif [ "$1" = reps ]; then
  $PY benchmarks/bench_serve_load.py --methods none "edd={$D}" --concurrency 64 --min-requests 192 --max-tokens 64 \
    --reps 3 --tag smollm2_cpu_intel_c64_stream_reps_s17
else
  $PY benchmarks/bench_serve_load.py --methods none "edd={$D}" "edd_skip_prefill={$D, \"env\": {\"SPECX_SKIP_PREFILL\": \"1\"}}" \
    "${COMMON[@]}" --distinct --tag smollm2_cpu_intel_c64_distinct_s17
fi
