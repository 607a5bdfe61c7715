#!/usr/bin/env bash
# Set up this checkout from scratch: a virtualenv in .venv with the project and its dev extras.
#   bash scripts/setup.sh                     # library + service
#   bash scripts/setup.sh --with-prometheus   # also the Prometheus server/promtool the observability tests use
#   bash scripts/setup.sh --with-ray          # also the `ray` extra (Ray Serve, for `mgg serve --backend ray`)
# Flags combine: bash scripts/setup.sh --with-prometheus --with-ray
# The Dockerfile runs the same commands. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1
PYTHON=${PYTHON:-python3}
EXTRAS=dev
WITH_PROMETHEUS=0
for arg in "$@"; do
  case "$arg" in
    --with-prometheus) WITH_PROMETHEUS=1 ;;
    --with-ray) EXTRAS="$EXTRAS,ray" ;;
    *) echo "setup.sh: unknown flag $arg (use --with-prometheus, --with-ray)" >&2; exit 2 ;;
  esac
done
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
if [ "$WITH_PROMETHEUS" = 1 ]; then
  bash .ci/install_prometheus.sh
fi
.venv/bin/python -c "import torch, timm; print(f'setup: torch {torch.__version__}, timm {timm.__version__}, cuda={torch.cuda.is_available()}')"
