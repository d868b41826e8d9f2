#!/usr/bin/env bash
# Fresh machine -> tests. Installs what it needs, then runs the default suite (not slow, not gpu).
# Extra pytest arguments pass through, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/install.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/python" -m pytest "$@"
