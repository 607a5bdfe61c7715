"""HTTP routes as ``APIRouter`` modules; :func:`register_routes` mounts them in the API's documented order.

- :mod:`.predict`: ``POST /predict`` (the V1 protocol over :class:`service.dataplane.DataPlane`);
- :mod:`.streams`: admin routes (``/reset``, ``/streams``...), behind the admin token;
- :mod:`.health`: ``/healthz``, ``/readyz``, ``/info``, ``/metrics``, ``/``;
- :mod:`.deps`: the dependencies they share (readiness, admin auth, stream-id checks).
"""
from __future__ import annotations

from fastapi import FastAPI

from . import health, predict, streams


def register_routes(app: FastAPI) -> None:
    """Mount every router on ``app`` (the order is the order of paths in the OpenAPI document)."""
    for module in (predict, streams, health):
        app.include_router(module.router)


__all__ = ["register_routes"]
