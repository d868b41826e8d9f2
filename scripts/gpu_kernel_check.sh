#!/usr/bin/env bash
# specx's Triton kernels compiled on a GPU, in one short call, with no vLLM: the device machines of this
# workplace have CUDA torch + Triton but no vLLM, and the official vLLM cannot be brought there within
# their limits (README, "Limitations and known problems"). What it checks needs only the engine-free code:
#   - tests/kernels + tests/core with the `gpu` tests included: the tree-attention kernel and the top-k
#     LM-head kernel compiled (not interpreted) against their torch references, realistic sizes included;
#   - benchmarks/bench_lm_head.py: SpecVocab's head against the full head + top-k and the fixed 32k head,
#     next to the memory-bandwidth floor (#5's GPU targets);
#   - benchmarks/bench_tree_attention.py: the tree-attention kernel against its torch reference and the
#     bandwidth floor, at SmolLM2 and Llama-8B head shapes (#4's verification kernel; each row checked
#     against the reference).
# Device call (about 3-5 min on an H100/H200; the timeout leaves room for one rerun):
#   run(command="bash scripts/gpu_kernel_check.sh", timeout_s=480)
# Results land in $OUT (the device tool's folder that comes back), else ./gpu-out.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi -L; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
status=0
$PY -m pytest -p no:cacheprovider tests/kernels tests/core -m "gpu or not slow" -q -ra 2>&1 \
  | tee "$out/kernel_tests.log" || status=1
$PY benchmarks/bench_lm_head.py --out-dir "$out" 2>&1 | tee "$out/bench_lm_head.log" || status=1
# Gemma-3-270M's head (vocab 262,144, hidden 640), where SpecVocab matters most
$PY benchmarks/bench_lm_head.py --out-dir "$out" --shapes 262144:640 --batches 1 8 32 --name gemma3_vocab 2>&1 \
  | tee "$out/bench_lm_head_gemma3.log" || status=1
$PY benchmarks/bench_tree_attention.py --out-dir "$out" 2>&1 | tee "$out/bench_tree_attention.log" || status=1
exit $status
