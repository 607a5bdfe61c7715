"""Pure ASGI middleware, :class:`HttpGuard`: request metrics, body-read timeouts, hang-ups, opaque 500s.

Contracts:

* Body timeouts. While a request's body is being read, each ``receive()`` may wait at most ``body_idle_timeout``
  seconds for the next chunk and the whole body must have arrived within ``body_timeout`` seconds of the first
  read. Past either, the request is answered ``408 body_timeout`` with ``Connection: close`` and the server closes
  the connection. (uvicorn's ``timeout_keep_alive`` only bounds the wait *between* requests, not a body that
  never comes.) Once the body is complete, ``receive()`` passes through untouched (disconnect listening).
* Header limits. A request with more than ``max_headers`` header fields, or whose header names and values take more
  than ``max_header_bytes`` together, is answered ``431 headers_too_large`` with ``Connection: close`` before the
  app sees it. (The protocol classes of :mod:`service.server`, below, bound the bytes buffered of a head that is
  still incomplete and the time a head may take; a complete head that arrived in one read is checked only here.)
* Hang-ups. A client that disconnects before its response is sent is not a server error: it is recorded with
  the status label ``499`` (nginx's "client closed request"), counted in ``tta_client_disconnects_total``,
  logged as one line without a traceback, and nothing is sent.
* Unhandled errors. Any other exception becomes ``500 internal_error`` whose body carries only a request id
  (no exception text, no paths); the traceback goes to the log once, under that id.
* Metrics. ``tta_http_request_duration_seconds`` and ``tta_http_requests_total`` by method, route template and
  status (499 included). Labels use the route template (``/streams/{stream_id}``), never the raw path, so a stream
  id cannot grow the metrics' cardinality; requests that match no route are labelled ``unmatched``. Likewise the
  method label is one of :data:`METRIC_METHODS` or ``other`` (h11 accepts any token as a method: a client
  inventing methods must not grow the series either).

Why our own: Starlette/uvicorn have no body-read timeout and report a mid-upload hang-up as an unhandled
exception (HTTP 500 plus two tracebacks); a pure ASGI wrapper is the one place that sees both.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import Counter
from starlette.requests import ClientDisconnect

from .metrics import ServiceMetrics

__all__ = ["BodyTimeout", "HttpGuard", "CLIENT_CLOSED", "METRIC_METHODS"]

log = logging.getLogger("mgg.service.http")
CLIENT_CLOSED = 499
#: the method label values of the HTTP metrics (any other method is labelled ``other``)
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyTimeout(Exception):
    """The request body did not arrive in time (raised from ``receive()`` while the body is read)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _Disconnected(Exception):
    pass


class HttpGuard:
    """Pure ASGI middleware; see the module docstring.

    Args:
        app: the ASGI app to guard.
        metrics: the app's metrics (the request histogram and counter; a disconnect counter is added).
        body_timeout: seconds from the first body read until the whole body has arrived.
        body_idle_timeout: seconds the server waits for each next chunk of a body.
        max_headers: header fields per request (None: no limit).
        max_header_bytes: bytes of header names and values per request (None: no limit).
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, body_timeout: float = 120.0,
                 body_idle_timeout: float = 15.0, max_headers: int | None = None,
                 max_header_bytes: int | None = None) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.metrics = metrics
        self.body_timeout = float(body_timeout)
        self.body_idle_timeout = float(body_idle_timeout)
        self.disconnects = _disconnect_counter(metrics)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        st: dict[str, Any] = {"status": 500, "started": False, "body_done": False, "deadline": None}

        async def guarded_receive() -> Message:
            if st["body_done"]:
                return await receive()
            now = time.monotonic()
            if st["deadline"] is None:
                st["deadline"] = now + self.body_timeout
            wait = min(self.body_idle_timeout, st["deadline"] - now)
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                which = "the next chunk" if wait >= self.body_idle_timeout else "the whole body"
                limit = self.body_idle_timeout if wait >= self.body_idle_timeout else self.body_timeout
                raise BodyTimeout(f"the request body did not arrive in time ({which} within {limit:g} s)") from None
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                st["body_done"] = True
            return message

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                st["status"], st["started"] = message["status"], True
            try:
                await send(message)
            except OSError as exc:  # the client went away while we answered
                raise _Disconnected() from exc

        try:
            too_large = self._headers_too_large(scope)
            if too_large:
                await self._answer(send, st, 431, "headers_too_large", too_large, close=True)
                return
            await self.app(scope, guarded_receive, tracked_send)
        except (ClientDisconnect, _Disconnected):
            self._hung_up(scope, st)
        except BodyTimeout as exc:
            log.info("%s %s: %s; closing the connection", scope.get("method"), scope.get("path"), exc.message)
            await self._answer(send, st, 408, "body_timeout", exc.message, close=True)
        except Exception:
            rid = uuid.uuid4().hex[:12]
            log.exception("unhandled error in %s %s (request id %s)", scope.get("method"), scope.get("path"), rid)
            await self._answer(send, st, 500, "internal_error",
                               f"an internal error occurred; the server log has the details under request id {rid}")
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in METRIC_METHODS else "other"
            labels = (method, path, str(st["status"]))  # the metrics' label order
            self.metrics.child(self.metrics.http_duration, *labels).observe(time.perf_counter() - t0)
            self.metrics.child(self.metrics.http_requests, *labels).inc()

    def _headers_too_large(self, scope: Scope) -> str | None:
        """Why the request's headers are over a limit, or None."""
        headers = scope.get("headers") or []
        if self.max_headers is not None and len(headers) > self.max_headers:
            return f"the request has {len(headers)} header fields; the limit is {self.max_headers}"
        size = sum(len(k) + len(v) for k, v in headers)
        if self.max_header_bytes is not None and size > self.max_header_bytes:
            return f"the request's header fields take {size} bytes; the limit is {self.max_header_bytes}"
        return None

    def _hung_up(self, scope: Scope, st: dict[str, Any]) -> None:
        st["status"] = CLIENT_CLOSED
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        self.disconnects.labels(route=route).inc()
        log.info("%s %s: the client disconnected before the response was sent", scope.get("method"),
                 scope.get("path"))

    async def _answer(
        self, send: Send, st: dict[str, Any], status: int, code: str, message: str, close: bool = False
    ) -> None:
        if st["started"]:  # too late for a clean answer: the connection is cut by the server
            return
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if close:
            headers.append((b"connection", b"close"))
        st["status"] = status
        try:
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except OSError:
            st["status"] = CLIENT_CLOSED


def _disconnect_counter(metrics: ServiceMetrics) -> Counter:
    existing = getattr(metrics, "client_disconnects", None)
    if existing is not None:
        return existing
    counter = Counter("tta_client_disconnects_total", "Requests whose client hung up before the answer (499).",
                      ["route"], registry=metrics.registry)
    metrics.client_disconnects = counter  # type: ignore[attr-defined]
    return counter
