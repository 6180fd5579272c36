#!/usr/bin/env bash
# The main job on the embedded default: set up the runtime (no test tools), then run examples/quickstart.yaml to its
# target on this machine (the small real model on CPU, local processes, local files).
set -euo pipefail
# The repo has a folder named `operator`, which is also a standard-library module: never let Python put the current
# directory first on sys.path (python -m / -c do), or `import operator` finds our folder.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
bash scripts/setup.sh --runtime
exec "${GENRUN_VENV:-.venv}/bin/genrun" run examples/quickstart.yaml "$@"
