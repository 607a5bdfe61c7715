"""uvicorn as the service runs it: connection-level limits as settings, and a request-head timeout uvicorn lacks.

Contracts (each a :class:`~service.settings.ServiceSettings` field, passed by :func:`uvicorn_options` to
``uvicorn.run`` in ``mgg serve`` and to the tests' live servers):

* ``limit_concurrency``: past this many open connections (or running requests), a new request is answered
  ``503 too_many_connections`` (the service's JSON error body, ``Retry-After: 1``, ``Connection: close``) before
  the app sees it.
* ``timeout_keep_alive_seconds``: an idle keep-alive connection (between requests) is closed after this long.
* ``max_header_bytes``: h11 buffers at most this many bytes of a request head that is still incomplete (``400``
  and the connection closed past it: h11's ``max_incomplete_event_size``, a memory bound). The exact limits on a
  complete head's bytes and field count (``max_header_bytes``, ``max_headers``: 431) are
  :class:`service.middleware.HttpGuard`'s.
* ``header_timeout_seconds``: the request line and headers must be complete this long after their first byte (or
  after the connection opened); past it the server answers ``408 header_timeout`` and closes the connection. A
  client sending its headers byte by byte (slowloris) therefore holds a connection, and a ``limit_concurrency``
  slot, for at most this long. The body's own time limits are :class:`service.middleware.HttpGuard`'s.

Why our own protocol class: uvicorn arms its keep-alive timer only after a response, so a connection that never
completes its request head is never timed out; and uvicorn answers its own refusals (the concurrency limit, an
unparsable request) in plain text. :class:`HeaderTimeoutH11Protocol` is uvicorn's h11 protocol plus that one timer,
and those two refusals in the service's JSON error shape (``{"error": {"code", "message"}}``). The service always
runs h11 (``http=`` this class): its byte limit on heads is the one configured,
whatever other HTTP parser is installed.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from .settings import ServiceSettings

__all__ = ["HeaderTimeoutH11Protocol", "uvicorn_options", "with_header_timeout"]

log = logging.getLogger("mgg.service.http")


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (``header_timeout`` seconds, a class attribute:
    :func:`with_header_timeout` makes the subclass for a setting)."""

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], *args: Any, **kw: Any) -> None:
        super().__init__(config, server_state, app_state, *args, **kw)
        # uvicorn's own check answers in plain text: the limit is enforced by _limited_app instead
        self._concurrency_limit, self.limit_concurrency = self.limit_concurrency, None
        if self._concurrency_limit is not None:
            self.app = cast(Any, self._limited_app(self.app))

    def _limited_app(self, app: Any) -> Any:
        """``app`` behind uvicorn's concurrency check (same counts; this request's task is already counted)."""
        limit = int(self._concurrency_limit)  # type: ignore[arg-type]

        async def limited(scope: dict, receive: Any, send: Any) -> None:
            if scope.get("type") == "http" and (len(self.connections) >= limit or len(self.tasks) > limit):
                log.warning("refused a request: more than limit_concurrency=%d connections or requests", limit)
                headers, body = _json_headers(
                    f"the server has reached its limit of {limit} concurrent connections or requests "
                    "(limit_concurrency); retry shortly", "too_many_connections", [(b"retry-after", b"1")])
                await send({"type": "http.response.start", "status": 503, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await app(scope, receive, send)
        return limited

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (or a head past ``max_header_bytes``), as JSON."""
        message = ("the request is not valid HTTP/1.1, or its head is larger than the server accepts "
                   "(max_header_bytes)")
        headers, body = _json_headers(message, "bad_http_request")
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Arm the deadline while a request head is awaited (h11's client state IDLE), cancel it once it is in."""
        if self.transport.is_closing():
            self._stop_head_timer()
        elif self.conn.their_state is h11.IDLE:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        else:
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written (pipelining): not the head's fault
        message = f"the request line and headers did not arrive within {self.header_timeout:g} s"
        log.info("%s: %s; closing the connection", self.client or "client", message)
        body = json.dumps({"error": {"code": "header_timeout", "message": message}}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


def _json_headers(message: str, code: str, extra: list[tuple[bytes, bytes]] | None = None
                  ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a connection-closing JSON error ``{"error": {"code", "message"}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *(extra or [])], body


def with_header_timeout(seconds: float) -> type[HeaderTimeoutH11Protocol]:
    """The protocol class for uvicorn's ``http=`` with a ``seconds`` deadline on request heads."""
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": float(seconds)})


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """``uvicorn.run``/``uvicorn.Config`` keyword arguments for the connection-level settings.

    Args:
        settings: the service settings (``limit_concurrency``, ``timeout_keep_alive_seconds``, ``max_header_bytes``,
            ``header_timeout_seconds``).
    """
    return {
        "http": with_header_timeout(settings.header_timeout_seconds),
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive_seconds,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
