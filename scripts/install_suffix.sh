#!/usr/bin/env bash
# Optional benchmark venv for vLLM's `suffix` speculative method (Arctic Inference suffix decoding).
# Kept apart from .venv because arctic-inference registers a `vllm.general_plugins` entry point.
# That plugin does nothing unless ARCTIC_INFERENCE_ENABLED=1 (it then demands CUDA and vllm==0.26.0):
# leave ARCTIC_INFERENCE_ENABLED unset; vLLM's suffix proposer only imports arctic_inference.suffix_decoding.
#   VENV_SUFFIX=path  (default: .venv-suffix in the checkout)
#   TORCH_WHEELS=folder with torch-2.13.0+cpu (default /opt/wheels, read by install.sh)   MAX_JOBS=compile jobs (default 2)
# Same exact package set as scripts/install.sh, plus arctic-inference built from its sdist against the
# venv's CPU torch. Only its suffix-tree extension is compiled: its CUDA custom ops are built only when
# ARCTIC_INFERENCE_PRECOMPILED_OPS=1, which this script unsets.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV_SUFFIX:-$root/.venv-suffix}
arctic=arctic-inference==0.3.0
# the project's exact package set and vllm-specx itself, as in .venv
VENV="$venv" bash "$root/scripts/install.sh" > /dev/null

if ! "$venv/bin/python" -c "import arctic_inference.suffix_decoding" 2>/dev/null; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # Build requirements other than torch go to a side folder on PYTHONPATH, not into the venv: the lock
  # pins protobuf 7 while the sdist wants protobuf 5.29.6 and grpcio-tools to generate its gRPC stubs.
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --target "$work/builddeps" \
    "setuptools>=61" wheel ninja "cmake>=3.18" "nanobind==2.9.2" "protobuf==5.29.6" grpcio-tools
  jobs=${MAX_JOBS:-2}
  # No build isolation (for the metadata step of the download too), so setup.py imports the venv's
  # torch 2.13.0+cpu instead of resolving torch>=2.10 from an index.
  build() {
    env -u ARCTIC_INFERENCE_PRECOMPILED_OPS \
      PATH="$work/builddeps/bin:$PATH" PYTHONPATH="$work/builddeps" \
      CMAKE_BUILD_PARALLEL_LEVEL="$jobs" MAX_JOBS="$jobs" \
      nice -n 19 "$venv/bin/python" -m pip "$@" -q --no-deps --no-build-isolation
  }
  build download --no-binary arctic-inference --dest "$work/sdist" "$arctic"
  build wheel --wheel-dir "$work/wheel" "$work"/sdist/arctic_inference-0.3.0.tar.gz
  # --no-deps: what suffix decoding needs at run time (numpy) is in the lock already.
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps "$work"/wheel/arctic_inference-*.whl
  "$venv/bin/python" -c "from arctic_inference.suffix_decoding import SuffixDecodingCache"
fi
echo "$venv"
