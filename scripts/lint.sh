#!/usr/bin/env bash
# ruff (lint + format check) on everything; mypy --strict on genrun.contract, .operator and .worker through a link
# tree laid out like the installed package (`operator/` must never be seen by a tool as the standard library's `operator`).
set -euo pipefail
# The repo has a folder named `operator`, which is also a standard-library module: never let Python put the current
# directory first on sys.path (python -m / -c do), or `import operator` finds our folder.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
VENV=${GENRUN_VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/genrun"
ln -s "$PWD/contract" "$tree/genrun/contract"
ln -s "$PWD/operator" "$tree/genrun/operator"
ln -s "$PWD/worker" "$tree/genrun/worker"
ln -s "$PWD/crds" "$tree/genrun/crds"
MYPYPATH="$tree" "$VENV/bin/mypy" --cache-dir "${TMPDIR:-/tmp}/genrun-mypy-cache" -p genrun.contract -p genrun.operator -p genrun.worker
