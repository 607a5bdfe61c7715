#!/usr/bin/env bash
# The GPU check in one command: set up a Python that can run the project (if needed), then scripts/gpu_check.py.
#   bash scripts/gpu_check.sh --quick --out "$OUT"     # flags go to gpu_check.py (--help lists them)
# Which Python, first that works:
#   1. $PYTHON, when set;
#   2. .venv/bin/python (bash scripts/setup.sh made it);
#   3. $BASE_PYTHON (default python3), when it already has the project's dependencies;
#   4. $BASE_PYTHON plus the wheels carried in .whl/ (bash scripts/gpu_wheels.sh makes them where pip works),
#      installed into $MGG_GPU_SITE (default /tmp/mgg-gpu-site) and put on PYTHONPATH after the checkout: for a GPU
#      machine without a package registry (the lent H200 has torch and timm but not the service's web stack);
#   5. bash scripts/setup.sh (needs a registry; minutes), then .venv/bin/python.
# The project itself is used from this checkout (PYTHONPATH), installed or not. Nothing is downloaded at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BASE_PYTHON=${BASE_PYTHON:-python3}
SITE=${MGG_GPU_SITE:-/tmp/mgg-gpu-site}
PROBE="import torch, timm, pytest, numpy, PIL, safetensors, fastapi, fastapi_offline, uvicorn, multipart, httpx, \
pydantic_settings, prometheus_client, yaml; import service.app, mgg_core.engine"
works() { "$1" -c "$PROBE" >/dev/null 2>&1; }

PY=
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x .venv/bin/python ] && works .venv/bin/python; then
  PY=.venv/bin/python
elif works "$BASE_PYTHON"; then
  PY=$BASE_PYTHON
elif compgen -G ".whl/*.whl" >/dev/null && "$BASE_PYTHON" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_check.sh: installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE"
  "$BASE_PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
  if works "$BASE_PYTHON"; then
    PY=$BASE_PYTHON
  else
    echo "gpu_check.sh: $BASE_PYTHON with the carried wheels still misses a dependency:" >&2
    "$BASE_PYTHON" -c "$PROBE" >&2 || true
  fi
fi
if [ -z "$PY" ]; then
  echo "gpu_check.sh: no Python with the project's dependencies: running scripts/setup.sh (needs a registry)"
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
echo "gpu_check.sh: $("$PY" -c 'import sys, torch; print(sys.executable, "torch", torch.__version__, "cuda", torch.cuda.is_available())')"
exec "$PY" scripts/gpu_check.py "$@"
