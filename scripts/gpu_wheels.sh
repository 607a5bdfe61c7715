#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package registry (the lent H200 image has torch, timm, numpy,
# pytest, httpx, prometheus-client, safetensors, ... but not the service's web stack). Run HERE, where pip works:
#   bash scripts/gpu_wheels.sh            # -> .whl/ (git-ignored; name it in the device call's `carry`)
# scripts/gpu_check.sh installs them there into a private folder on PYTHONPATH. Versions are this checkout's
# .venv's (the ones the tests pass with), for CPython 3.12 on manylinux x86-64 (the GPU image's python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
PACKAGES=(fastapi starlette fastapi_offline uvicorn python-multipart pydantic pydantic-core pydantic-settings
          annotated-types annotated-doc typing-inspection typing-extensions python-dotenv timm)
VENV_PY=${VENV_PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
for pkg in "${PACKAGES[@]}"; do
  ver=$("$VENV_PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pkg==$ver"
done
ls .whl && du -sh .whl
