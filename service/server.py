"""uvicorn as the service runs it: connection-level limits as settings, and a request-head timeout uvicorn lacks.

Contracts (each a :class:`~service.settings.ServiceSettings` field, passed by :func:`uvicorn_options` to
``uvicorn.run`` in ``mgg serve`` and to the tests' live servers):

* ``http_parser``: the HTTP/1.1 parser under the protocol class, ``"httptools"`` (llhttp, in C: the default; in
  scripts/bench_http_parser.py 0.4 to 0.9 x h11's server CPU per request over three runs, which matters when many
  small requests share one event loop, issue 10) or ``"h11"`` (pure Python). Both protocol classes keep every
  limit below, with the same answers.
* ``limit_concurrency``: past this many open connections (or running requests), a new request is answered
  ``503 too_many_connections`` (the service's JSON error body, ``Retry-After: 1``, ``Connection: close``) before
  the app sees it.
* ``timeout_keep_alive_seconds``: an idle keep-alive connection (between requests) is closed after this long.
* ``max_header_bytes``: the server buffers at most this many bytes of a request head that is still incomplete
  (``400 bad_http_request`` and the connection closed past it, a memory bound). With h11 that is h11's
  ``max_incomplete_event_size``; with httptools the protocol counts the bytes of the reads that leave a head
  begun and incomplete, the one that began it from the end of the body before it (with pipelined requests, the
  previous request's body tail is not counted; its chunk framing, and whole earlier requests read together with
  the head's start, are: the bound may refuse such a head early, never late; llhttp keeps the fields of an
  incomplete head in memory without a limit of its own). The exact limits on a complete head's bytes and field
  count (``max_header_bytes``, ``max_headers``: 431) are :class:`service.middleware.HttpGuard`'s.
* ``header_timeout_seconds``: the request line and headers must be complete this long after their first byte (or
  after the connection opened); past it the server answers ``408 header_timeout`` and closes the connection. A
  client sending its headers byte by byte (slowloris) therefore holds a connection, and a ``limit_concurrency``
  slot, for at most this long. The body's own time limits are :class:`service.middleware.HttpGuard`'s; a body
  still arriving after its request was answered (nobody reads it) is cut off by the same deadline, counted from
  its first byte after the answer (the connection closed without a second answer).

Why our own protocol classes: uvicorn arms its keep-alive timer only after a response, so a connection that never
completes its request head is never timed out; uvicorn's httptools protocol bounds no head at all; and uvicorn
answers its own refusals (the concurrency limit, an unparsable request) in plain text. :class:`HeaderTimeoutH11Protocol`
and :class:`HeaderTimeoutHttpToolsProtocol` are uvicorn's two protocols plus that timer, the head bound, and those
refusals in the service's JSON error shape (``{"error": {"code", "message"}}``); what they share is
:class:`_ServiceProtocol`. Which class a parser name means is data: :data:`PROTOCOLS`.
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

__all__ = ["PROTOCOLS", "HeaderTimeoutH11Protocol", "HeaderTimeoutHttpToolsProtocol", "protocol_class",
           "uvicorn_options"]

log = logging.getLogger("mgg.service.http")

_BAD_REQUEST = ("the request is not valid HTTP/1.1, or its head is larger than the server accepts "
                "(max_header_bytes)")


class _ServiceProtocol:
    """What both protocol classes add to uvicorn's (this class comes first in their bases, so its methods wrap
    uvicorn's): the JSON concurrency refusal, the JSON 400, the head deadline (``header_timeout`` seconds, a class
    attribute: :func:`protocol_class` makes the subclass for a setting). A subclass says when a head is awaited
    (:meth:`_awaiting_head`) and when an answered request's body is still arriving (:meth:`_draining`)."""

    header_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    # uvicorn's attributes, set by its protocol classes
    app: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set
    tasks: set
    client: Any
    cycle: Any
    limit_concurrency: int | None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any], *args: Any, **kw: Any) -> None:
        super().__init__(config, server_state, app_state, *args, **kw)  # type: ignore[call-arg]
        # uvicorn's own check answers in plain text: the limit is enforced by _limited_app instead
        self._concurrency_limit, self.limit_concurrency = self.limit_concurrency, None
        if self._concurrency_limit is not None:
            self.app = cast(Any, self._limited_app(self.app))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser cannot parse (or a head past the head bound), as JSON."""
        self._write_and_close(400, b"Bad Request", _BAD_REQUEST, "bad_http_request")

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

    def _draining(self) -> bool:
        """True while a request body still arrives after its response is complete (nobody reads it: uvicorn drops
        those bytes, and each read cancels its keep-alive timer, so without a deadline a client trickling such a
        body would hold the connection forever)."""
        raise NotImplementedError

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
        if self._draining():  # the request was answered: no second answer, just the close
            log.info("%s: a request body still arriving %g s after its answer; closing the connection",
                     self.client or "client", self.header_timeout)
            self.transport.close()
            return
        message = f"the request line and headers did not arrive within {self.header_timeout:g} s"
        log.info("%s: %s; closing the connection", self.client or "client", message)
        self._write_and_close(408, b"Request Timeout", message, "header_timeout")

    def _write_and_close(self, status: int, reason: bytes, message: str, code: str) -> None:
        """A connection-closing JSON error (:func:`_json_headers`) written straight to the transport (no response
        of the cycle runs)."""
        headers, body = _json_headers(message, code)
        self.transport.write(b"HTTP/1.1 %d %s\r\n" % (status, reason)
                             + b"".join(b"%s: %s\r\n" % kv for kv in headers) + b"\r\n" + body)
        self.transport.close()


class HeaderTimeoutH11Protocol(_ServiceProtocol, H11Protocol):
    """uvicorn's h11 protocol with the service's head deadline and JSON refusals (module docstring)."""

    _served = False  # a request has begun on this connection

    def data_received(self, data: bytes) -> None:
        if (self._served and self.conn.their_state is h11.IDLE and self._head_timer is not None
                and not self.conn.trailing_data[0]):
            # a later request's first byte: its deadline runs from here, not from the read that ended the body
            # of a request answered before it arrived (h11 refuses blank lines between requests: no restart loop)
            self._stop_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._served = True
        self._watch_head()

    def _awaiting_head(self) -> bool:
        return self.conn.their_state is h11.IDLE or self._draining()

    def _draining(self) -> bool:
        return (self.conn.their_state is h11.SEND_BODY and self.cycle is not None
                and self.cycle.response_complete)


class HeaderTimeoutHttpToolsProtocol(_ServiceProtocol, HttpToolsProtocol):
    """uvicorn's httptools protocol with the service's head deadline, head byte bound and JSON refusals (module
    docstring). A head is awaited from the connection's start until its first request's headers are complete, from
    a later request's first byte until its headers are complete, and after bytes between requests that begin none
    (llhttp skips blank lines there: they must not hold a connection open either)."""

    max_head_bytes: int = 16 * 1024
    _fresh = True           # no request has begun on this connection yet
    _head_begun = False     # a request head has begun and is incomplete
    _in_message = False     # a request has begun and its body is not complete
    _stray = False          # bytes arrived between requests and began none
    _head_bytes = 0         # bytes of the reads that left the current head begun and incomplete
    _begun = 0              # requests begun on this connection
    _read_body = 0          # body bytes the parser passed on from the current read so far
    _head_start = 0         # ... when the current head began (its read's bytes before it: at least these)

    def data_received(self, data: bytes) -> None:
        begun, in_message = self._begun, self._in_message
        self._read_body = 0
        super().data_received(data)
        if self.transport.is_closing():
            self._stop_head_timer()
            return
        if self._head_begun:
            # the read that began the head counts from the end of the body before it (a pipelined request's
            # body tail is no part of this head), later reads whole
            self._head_bytes += len(data) - (self._head_start if self._begun != begun else 0)
            if self._head_bytes > self.max_head_bytes:
                log.info("%s: a request head past %d bytes; closing the connection", self.client or "client",
                         self.max_head_bytes)
                self.send_400_response("")
        elif self._begun == begun and not self._in_message and (
                not in_message or self.cycle is None or self.cycle.response_complete):
            # bytes that began no request and ended none whose answer is pending (the read ending a body
            # before its answer is not stray: the keep-alive timer takes over once the answer is written; one
            # ending a body after its answer is: nothing else would time the connection out)
            self._stray = True
        self._watch_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._fresh:  # a later request's head: its deadline runs from its first byte, not from earlier
            self._stop_head_timer()  # stray bytes or an unread body (_watch_head re-arms it after this read)
        self._fresh = self._stray = False
        self._head_begun = self._in_message = True
        self._head_bytes = 0
        self._head_start = self._read_body
        self._begun += 1

    def on_body(self, body: bytes) -> None:
        self._read_body += len(body)
        super().on_body(body)

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_message = False
        super().on_message_complete()

    def _awaiting_head(self) -> bool:
        return self._fresh or self._head_begun or self._stray or self._draining()

    def _draining(self) -> bool:
        return (self._in_message and not self._head_begun and self.cycle is not None
                and self.cycle.response_complete)


def _json_headers(message: str, code: str, extra: list[tuple[bytes, bytes]] | None = None
                  ) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of a connection-closing JSON error ``{"error": {"code", "message"}}``."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *(extra or [])], body


#: ``http_parser`` setting -> the protocol class
PROTOCOLS: dict[str, type[_ServiceProtocol]] = {
    "h11": HeaderTimeoutH11Protocol,
    "httptools": HeaderTimeoutHttpToolsProtocol,
}


def protocol_class(parser: str, header_timeout: float, max_head_bytes: int) -> type:
    """The protocol class for uvicorn's ``http=``: parser ``parser`` (a :data:`PROTOCOLS` key), a
    ``header_timeout`` seconds deadline on request heads, at most ``max_head_bytes`` buffered of an incomplete head.

    Args:
        parser: ``"httptools"`` or ``"h11"``.
        header_timeout: seconds from a head's first byte (or the connection's start) to its end.
        max_head_bytes: bytes of a request head still incomplete (h11: passed as its own limit by
            :func:`uvicorn_options` too).
    """
    base = PROTOCOLS.get(parser)
    if base is None:
        raise ValueError(f"unknown http_parser {parser!r}; one of {sorted(PROTOCOLS)}")
    return type(base.__name__, (base,), {"header_timeout": float(header_timeout),
                                         "max_head_bytes": int(max_head_bytes)})


def uvicorn_options(settings: ServiceSettings) -> dict[str, Any]:
    """``uvicorn.run``/``uvicorn.Config`` keyword arguments for the connection-level settings.

    Args:
        settings: the service settings (``http_parser``, ``limit_concurrency``, ``timeout_keep_alive_seconds``,
            ``max_header_bytes``, ``header_timeout_seconds``).
    """
    return {
        "http": protocol_class(settings.http_parser, settings.header_timeout_seconds, settings.max_header_bytes),
        "limit_concurrency": settings.limit_concurrency,
        "timeout_keep_alive": settings.timeout_keep_alive_seconds,
        "h11_max_incomplete_event_size": settings.max_header_bytes,
    }
