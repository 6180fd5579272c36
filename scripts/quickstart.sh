#!/usr/bin/env bash
# The main job on the embedded default: set up, then run examples/quickstart.yaml to its target on this machine
# (the small real model on CPU, local processes, local files).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${GENRUN_VENV:-.venv}/bin/genrun" run examples/quickstart.yaml "$@"
