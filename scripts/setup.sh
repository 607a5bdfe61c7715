#!/usr/bin/env bash
# Set up this checkout from scratch: a virtualenv in .venv with the project and its dev extras.
#   bash scripts/setup.sh                     # library + service
#   bash scripts/setup.sh --with-prometheus   # also the Prometheus server/promtool the observability tests use
# The Dockerfile runs the same commands. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
if [ "${1:-}" = "--with-prometheus" ]; then
  bash .ci/install_prometheus.sh
fi
.venv/bin/python -c "import torch, timm; print(f'setup: torch {torch.__version__}, timm {timm.__version__}, cuda={torch.cuda.is_available()}')"
