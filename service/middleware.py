"""Pure ASGI middleware: HTTP latency histogram and request counter by method, route template and status.

Labels use the route template (``/streams/{stream_id}``), never the raw path, so a stream id cannot grow the
metrics' cardinality; requests that match no route are labelled ``unmatched``.
"""
from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .metrics import ServiceMetrics

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"  # starlette sets a Route; Mount or none otherwise
            labels = {"method": scope.get("method", ""), "route": path, "status": str(status["code"])}
            self.metrics.http_duration.labels(**labels).observe(time.perf_counter() - t0)
            self.metrics.http_requests.labels(**labels).inc()


__all__ = ["HttpMetricsMiddleware"]
