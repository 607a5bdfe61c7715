"""HTTP service for online test-time adaptation (FastAPI); see service.app.create_app and `mgg serve`."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download weights at run time (see mgg_core)

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("mgg-tta")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installation
    __version__ = "0.0.0+local"
