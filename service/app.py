"""FastAPI app: online test-time adaptation over HTTP with per-stream state.

``create_app(settings)`` assembles the parts: the lifespan loads the classifier and builds the engine in a
background task (:class:`~service.runtime.ServiceState`; /healthz answers at once and /readyz turns true after a
warm-up step), opens the :class:`~service.store.StreamStore` and, on graceful shutdown, snapshots every stream.
Errors (:mod:`service.errors`), routes (:mod:`service.routes`) and the inference path (:mod:`service.dataplane`)
live in their own modules.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from . import __version__
from .dataplane import DataPlane, make_predictions
from .errors import ApiError, register_error_handlers
from .metrics import ServiceMetrics
from .middleware import HttpGuard
from .routes import register_routes
from .runtime import Runtime, ServiceState, load_runtime
from .settings import ServiceSettings
from .v2 import router as v2_router

log = logging.getLogger("mgg.service")

DESCRIPTION = (
    "Online test-time adaptation of an image classifier, one adapting state per stream "
    "(header `X-Stream-Id`). Each POST /predict classifies a batch and then takes one adaptation "
    "step on it; states are kept in memory under a byte budget and snapshotted to disk. "
    "Errors always have the body `{\"error\": {\"code\": ..., \"message\": ...}}`."
)


def _lifespan(svc: ServiceState) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(svc.startup(), name="mgg-model-loader")
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loader
            await svc.shutdown()

    return lifespan


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The service's ASGI app.

    Args:
        settings: service settings; default: ``ServiceSettings()`` (environment, .env, defaults).
    """
    settings, generated = (settings or ServiceSettings()).with_safe_admin_token()
    if generated is not None:  # binding beyond loopback: admin routes are never left open
        print(f"mgg serve: {settings.host} is reachable beyond this machine and no admin token is set; "
              f"generated admin token for this run: {generated}  (set MGG_ADMIN_TOKEN to choose one)",
              file=sys.stderr, flush=True)
        log.warning("no admin token set while binding %s: generated one for this run (printed on stderr)",
                    settings.host)
    metrics = ServiceMetrics()
    svc = ServiceState(settings, metrics)
    # FastAPIOffline: /docs and /redoc load swagger-ui/redoc from the package (/static-offline-docs), not a CDN
    app = FastAPIOffline(title="MGG test-time adaptation service", version=__version__, description=DESCRIPTION,
                         lifespan=_lifespan(svc))
    app.state.svc = svc
    app.state.dataplane = DataPlane(svc)
    app.add_middleware(HttpGuard, metrics=metrics, body_timeout=settings.body_timeout_seconds,
                       body_idle_timeout=settings.body_idle_timeout_seconds, max_headers=settings.max_headers,
                       max_header_bytes=settings.max_header_bytes)
    register_error_handlers(app)
    register_routes(app)
    app.include_router(v2_router)  # the Open Inference Protocol (KServe V2) beside /predict
    return app


__all__ = ["ApiError", "Runtime", "create_app", "load_runtime", "make_predictions"]
