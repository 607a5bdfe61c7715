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
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI

from . import __version__
from .dataplane import DataPlane, make_predictions
from .errors import ApiError, register_error_handlers
from .metrics import ServiceMetrics
from .middleware import HttpMetricsMiddleware
from .routes import register_routes
from .runtime import Runtime, ServiceState, load_runtime
from .settings import ServiceSettings

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
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    svc = ServiceState(settings, metrics)
    app = FastAPI(title="MGG test-time adaptation service", version=__version__, description=DESCRIPTION,
                  lifespan=_lifespan(svc))
    app.state.svc = svc
    app.state.dataplane = DataPlane(svc)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    register_error_handlers(app)
    register_routes(app)
    return app


__all__ = ["ApiError", "Runtime", "create_app", "load_runtime", "make_predictions"]
