"""uvicorn as the service runs it: connection-level limits as settings, and a request-head timeout uvicorn lacks.

Contracts (each a :class:`~service.settings.ServiceSettings` field, passed by :func:`uvicorn_options` to
``uvicorn.run`` in ``mgg serve`` and to the tests' live servers):

* ``limit_concurrency``: past this many open connections (or running requests), a new request is answered
  ``503 too_many_connections`` (the service's JSON error body, ``Retry-After: 1``, ``Connection: close``) before
  the app sees it.
* ``timeout_keep_alive_seconds``: an idle keep-alive connection (between requests) is closed after this long.
* ``max_header_bytes``: at most this many bytes of a request head that is still incomplete are buffered (``400``
  and the connection closed past it: a memory bound; h11's ``max_incomplete_event_size``, counted by
  :class:`HeaderTimeoutHttpToolsProtocol` itself for httptools, which has no such bound). The exact limits on a
  complete head's bytes and field count (``max_header_bytes``, ``max_headers``: 431) are
  :class:`service.middleware.HttpGuard`'s.
* ``header_timeout_seconds``: the request line and headers must be complete this long after their first byte (or
  after the connection opened); past it the server answers ``408 header_timeout`` and closes the connection. A
  client sending its headers byte by byte (slowloris) therefore holds a connection, and a ``limit_concurrency``
  slot, for at most this long. The body's own time limits are :class:`service.middleware.HttpGuard`'s.
* ``http_parser``: ``httptools`` (the default) or ``h11``; every contract above holds for both (the tests run each
  one with each parser).

Why our own protocol classes: uvicorn arms its keep-alive timer only after a response, so a connection that never
completes its request head is never timed out; and uvicorn answers its own refusals (the concurrency limit, an
unparsable request) in plain text. :class:`HeaderTimeoutHttpToolsProtocol` and :class:`HeaderTimeoutH11Protocol`
are uvicorn's protocols plus that one timer, the bound on an incomplete head where the parser lacks one, and those
refusals in the service's JSON error shape (``{"error": {"code", "message"}}``). Why httptools by default: every request
of the process goes through the one event loop, and httptools parses in C (llhttp) where h11 parses in Python. A
closed loop of 16 streams of 4-image requests measured -4 to +18% images/s, +8% on average, over five alternating
runs (docs/results/fused/README.md, session 7).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

if TYPE_CHECKING:
    from .settings import ServiceSettings

__all__ = ["PROTOCOLS", "HeaderTimeoutH11Protocol", "HeaderTimeoutHttpToolsProtocol", "uvicorn_options",
           "with_header_timeout"]

log = logging.getLogger("mgg.service.http")


class _ServiceHttp:
    """What both protocol classes add to uvicorn's: the deadline on request heads, the bound on a head still
    incomplete, and uvicorn's own refusals (the concurrency limit, an unparsable or oversized head) as the
    service's JSON errors. Mixed in before uvicorn's protocol class; the subclass says when a head is awaited
    (:meth:`_awaiting_head`)."""

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    # uvicorn's protocol attributes this mixin reads
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    tasks: set[Any]
    cycle: Any
    client: Any
    app: Any
    limit_concurrency: int | None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], *args: Any, **kw: Any) -> None:
        super().__init__(config, server_state, app_state, *args, **kw)  # type: ignore[call-arg]
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

    def _awaiting_head(self) -> bool:
        raise NotImplementedError

    def _send_bad_request(self) -> None:
        """The answer to a request that cannot be parsed, or whose head passed ``max_header_bytes``: a JSON 400,
        then the connection is closed."""
        message = ("the request is not valid HTTP/1.1, or its head is larger than the server accepts "
                   "(max_header_bytes)")
        headers, body = _json_headers(message, "bad_http_request")
        self.transport.write(_raw_response(400, b"Bad Request", headers, body))
        self.transport.close()

    def _watch_head(self) -> None:
        """Arm the deadline while a request head is awaited, cancel it once it is in."""
        if self.transport.is_closing():
            self._stop_head_timer()
        elif self._awaiting_head():
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
        if self.transport.is_closing() or not self._awaiting_head():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being written (pipelining): not the head's fault
        message = f"the request line and headers did not arrive within {self.header_timeout:g} s"
        log.info("%s: %s; closing the connection", self.client or "client", message)
        headers, body = _json_headers(message, "header_timeout")
        self.transport.write(_raw_response(408, b"Request Timeout", headers, body))
        self.transport.close()


class HeaderTimeoutH11Protocol(_ServiceHttp, H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head (``header_timeout`` seconds, a class attribute:
    :func:`with_header_timeout` makes the subclass for a setting). h11 itself bounds a head still incomplete
    (``h11_max_incomplete_event_size``)."""

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse (or a head past ``max_header_bytes``), as JSON."""
        self._send_bad_request()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)


class HeaderTimeoutHttpToolsProtocol(_ServiceHttp, HttpToolsProtocol):
    """uvicorn's httptools protocol (llhttp, a C parser) with the same deadline on request heads, and the bound on a
    head still incomplete that h11 has and httptools lacks: past ``max_head_bytes`` bytes of a head (class
    attributes, :func:`with_header_timeout`) the answer is the same JSON 400 and the connection is closed."""

    max_head_bytes: int = 16 * 1024
    _head_open = True      # the next bytes start (or continue) a request head
    _head_bytes = 0        # bytes received while the current head was open

    def _awaiting_head(self) -> bool:
        return self._head_open

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request httptools cannot parse, as JSON."""
        self._send_bad_request()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():
            self._stop_head_timer()
            return
        if self._head_open and self._head_bytes > self.max_head_bytes:
            self._stop_head_timer()
            self._send_bad_request()
            return
        self._watch_head()

    def on_headers_complete(self) -> None:
        self._head_open, self._head_bytes = False, 0
        self._stop_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._head_open = True  # what follows is the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)


def _json_headers(message: str, code: str, extra: list[tuple[bytes, bytes]] | None = None
                  ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a connection-closing JSON error ``{"error": {"code", "message"}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *(extra or [])], body


def _raw_response(status: int, reason: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A complete HTTP/1.1 response, written straight to the transport (no parser state involved)."""
    head = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return b"HTTP/1.1 " + str(status).encode() + b" " + reason + b"\r\n" + head + b"\r\n" + body


#: the protocol class of each ``http_parser`` setting
PROTOCOLS: dict[str, type[_ServiceHttp]] = {"httptools": HeaderTimeoutHttpToolsProtocol,
                                             "h11": HeaderTimeoutH11Protocol}


def with_header_timeout(seconds: float, parser: str = "h11", max_head_bytes: int = 16 * 1024) -> type[_ServiceHttp]:
    """The protocol class for uvicorn's ``http=``.

    Args:
        seconds: the deadline on each request head.
        parser: ``"httptools"`` or ``"h11"`` (:data:`PROTOCOLS`).
        max_head_bytes: the bound on a head still incomplete (httptools; h11 gets it as uvicorn's
            ``h11_max_incomplete_event_size``).
    """
    base = PROTOCOLS[parser]
    return type(base.__name__, (base,), {"header_timeout": float(seconds), "max_head_bytes": int(max_head_bytes)})


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """``uvicorn.run``/``uvicorn.Config`` keyword arguments for the connection-level settings.

    Args:
        settings: the service settings (``limit_concurrency``, ``timeout_keep_alive_seconds``, ``max_header_bytes``,
            ``header_timeout_seconds``, ``http_parser``).
    """
    return {
        "http": with_header_timeout(settings.header_timeout_seconds, settings.http_parser, settings.max_header_bytes),
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive_seconds,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
