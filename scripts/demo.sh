#!/usr/bin/env bash
# Fresh machine -> the main job: SmolLM2-135M with and without the bundled EDD drafter.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=$(bash "$root/scripts/install.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/vllm-specx" demo "$@"
