"""Connection-level limits (service/server.py, HttpGuard's header checks): each setting hit by a raw-socket client on
loopback, with each HTTP parser (``http_parser``: httptools, the default, and h11). Bounded: every socket has a
timeout and every wait a deadline."""
from __future__ import annotations

import contextlib
import json
import socket
import time
import weakref
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import service_settings

from service.server import PROTOCOLS, HeaderTimeoutH11Protocol, HeaderTimeoutHttpToolsProtocol, uvicorn_options

TOKEN = "conn-token"


def settings(snapshot_dir: Path, **kw):
    """The loopback test settings (conftest.service_settings) with this module's admin token."""
    return service_settings(snapshot_dir, **{"admin_token": TOKEN, **kw})


@pytest.fixture(params=sorted(PROTOCOLS))
def parser(request: pytest.FixtureRequest) -> str:
    """Each live-server test runs once per HTTP parser."""
    return request.param


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


# bytes read past a response (a pipelined next response that arrived in the same recv), for the socket's next read
_LEFTOVER: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(s: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response (Content-Length framed); bytes past it are kept for the next call on
    ``s`` (two pipelined responses can arrive in one read)."""
    buf = _LEFTOVER.pop(s, b"")
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    n = int(headers.get("content-length", "0"))
    while len(body) < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    if len(body) > n:
        body, _LEFTOVER[s] = body[:n], body[n:]
    return int(lines[0].split()[1]), headers, body


def closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server closes ``s`` within ``within`` seconds (any bytes before the close are skipped)."""
    s.settimeout(within)
    try:
        while s.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def trickle(s: socket.socket, data: bytes, seconds: float, every: float) -> None:
    """Send ``data`` every ``every`` seconds for ``seconds``, or until the server closes the connection."""
    t0 = time.monotonic()
    with contextlib.suppress(OSError):
        while time.monotonic() - t0 < seconds:
            s.sendall(data)
            time.sleep(every)


def get(port: int, path: str = "/healthz", extra: str = "") -> tuple[int, dict[str, str], bytes]:
    with connect(port) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        return read_response(s)


def test_settings_reach_uvicorn():
    opts = uvicorn_options(settings(Path("x"), limit_concurrency=7, timeout_keep_alive_seconds=3,
                                            header_timeout_seconds=2.5, max_header_bytes=4096))
    assert opts["limit_concurrency"] == 7 and opts["timeout_keep_alive"] == 3
    assert opts["h11_max_incomplete_event_size"] == 4096
    assert issubclass(opts["http"], HeaderTimeoutHttpToolsProtocol)  # the default parser
    assert opts["http"].header_timeout == 2.5 and opts["http"].max_head_bytes == 4096
    h11 = uvicorn_options(settings(Path("x"), http_parser="h11", header_timeout_seconds=1.5))["http"]
    assert issubclass(h11, HeaderTimeoutH11Protocol) and h11.header_timeout == 1.5


def test_slowloris_headers_are_cut_off(live_server, tmp_path, parser):
    srv = live_server(settings(tmp_path / "s", http_parser=parser, header_timeout_seconds=1.0))
    with connect(srv.port) as slow, connect(srv.port) as silent:
        t0 = time.monotonic()
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        status = None
        for byte in b"X-Stream-Id: slowloris-one-byte-at-a-time\r\n" * 4:  # ~9 s at this pace: never finishes
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
            if time.monotonic() - t0 > 1.2:
                break
        status, headers, body = read_response(slow)
        elapsed = time.monotonic() - t0
        assert status == 408 and json.loads(body)["error"]["code"] == "header_timeout"
        assert headers["connection"] == "close" and 0.9 < elapsed < 5, elapsed
        assert closed_by_server(slow, 5)
        # a connection that sends nothing at all is closed on the same deadline
        status, _, _ = read_response(silent)
        assert status == 408 and closed_by_server(silent, 5)
    # a request whose head arrives in time is unaffected, also over several keep-alive requests
    with connect(srv.port) as s:
        for _ in range(3):
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_response(s)[0] == 200
            time.sleep(0.6)  # idle between requests is the keep-alive timeout's business (5 s), not the head's
        # blank lines between requests (which the parsers skip) do not hold the connection open past the deadline
        t0 = time.monotonic()
        trickle(s, b"\r\n", seconds=3, every=0.2)
        assert closed_by_server(s, 5) and time.monotonic() - t0 < 4


def test_keep_alive_timeout_closes_idle_connections(live_server, tmp_path, parser):
    srv = live_server(settings(tmp_path / "s", http_parser=parser, timeout_keep_alive_seconds=1))
    with connect(srv.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(s)[0] == 200
        t0 = time.monotonic()
        assert closed_by_server(s, 5) and 0.8 < time.monotonic() - t0 < 4


def test_connections_past_limit_concurrency_get_503(live_server, tmp_path, parser):
    limit = 4
    srv = live_server(settings(tmp_path / "s", http_parser=parser, limit_concurrency=limit, header_timeout_seconds=60))

    refusals = []

    def status_with(idle: int) -> int:
        with ExitStack() as stack:
            for _ in range(idle):
                stack.enter_context(connect(srv.port))
            time.sleep(0.2)  # the server has accepted them
            status, headers, body = get(srv.port)
            if status == 503:
                refusals.append((headers, body))
            return status

    deadline = time.monotonic() + 10
    while status_with(limit - 2) != 200:  # earlier connections (readiness polls) may still be closing
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status_with(limit - 1) == 503  # the probe is the limit-th connection
    assert status_with(limit + 5) == 503
    assert status_with(0) == 200  # back once they are gone
    for headers, body in refusals:  # the service's JSON error shape, not uvicorn's plain text
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert headers["retry-after"] == "1"
        error = json.loads(body)["error"]
        assert error["code"] == "too_many_connections" and f"limit of {limit}" in error["message"]


def test_header_count_and_bytes_limits(live_server, tmp_path, parser):
    srv = live_server(settings(tmp_path / "s", http_parser=parser, max_headers=20, max_header_bytes=2048))
    limits = json.loads(get(srv.port, "/info")[2])["limits"]
    assert (limits["max_headers"], limits["max_header_bytes"], limits["limit_concurrency"]) == (20, 2048, 512)
    host = len("host") + len("127.0.0.1")  # the Host header get() sends
    ok_fields = "".join(f"X-H{i}: v\r\n" for i in range(19))  # 20 fields with Host
    assert get(srv.port, extra=ok_fields)[0] == 200
    status, headers, body = get(srv.port, extra=ok_fields + "X-H19: v\r\n")
    assert status == 431 and json.loads(body)["error"]["code"] == "headers_too_large" and "21" in body.decode()
    assert headers["connection"] == "close"
    pad = 2048 - host - len("x-pad")  # names and values: exactly at the limit, then one byte over
    assert get(srv.port, extra=f"X-Pad: {'a' * pad}\r\n")[0] == 200
    status, _, body = get(srv.port, extra=f"X-Pad: {'a' * (pad + 1)}\r\n")
    assert status == 431 and "2049 bytes" in body.decode()


def test_incomplete_head_buffer_is_bounded(live_server, tmp_path, parser):
    srv = live_server(settings(tmp_path / "s", http_parser=parser, max_header_bytes=2048, header_timeout_seconds=30))
    with connect(srv.port) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.2)
        s.sendall(b"X-Pad: " + b"a" * 4096)  # still no end of the head: the server refuses to buffer more
        status, headers, body = read_response(s)
        assert status == 400 and closed_by_server(s, 5)
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"]["code"] == "bad_http_request" and "max_header_bytes" in body.decode()


def test_one_read_larger_than_the_head_bound_is_not_a_head(live_server, tmp_path, parser):
    """The head bound counts a head's bytes, not a read's: a small head read together with a large body, and a
    head exactly as large as the limit arriving byte group by byte group, both pass."""
    srv = live_server(settings(tmp_path / "s", http_parser=parser, max_header_bytes=2048))
    body = b"x" * 60_000
    with connect(srv.port) as s:
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        status, headers, answer = read_response(s)
        assert status == 405 and headers["content-type"] == "application/json", answer  # the app's answer
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # the connection still serves
        assert read_response(s)[0] == 200
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 1900 + b"\r\n\r\n"
    assert len(head) < 2048
    with connect(srv.port) as s:
        for i in range(0, len(head), 100):
            s.sendall(head[i:i + 100])
            time.sleep(0.005)
        assert read_response(s)[0] == 200


def test_unparsable_request_gets_a_json_400(live_server, tmp_path, parser):
    srv = live_server(settings(tmp_path / "s", http_parser=parser))
    with connect(srv.port) as s:
        s.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 400 and headers["content-type"] == "application/json" and closed_by_server(s, 5)
        assert set(json.loads(body)) == {"error"} and json.loads(body)["error"]["code"] == "bad_http_request"
    assert get(srv.port)[0] == 200  # the server is unaffected


@pytest.mark.parametrize("field", ["limit_concurrency", "timeout_keep_alive_seconds", "header_timeout_seconds",
                                   "max_headers"])
def test_limits_refuse_nonsense(field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        settings(Path("x"), **{field: 0})


def test_head_deadline_runs_from_the_heads_first_byte(live_server, tmp_path, parser):
    """A body that arrives in a read of its own (after its head, or after its answer) starts no head deadline: the
    next request on the connection, its head split over reads that together take less than the deadline, passes,
    whatever the time between the body and that head (within the keep-alive timeout)."""
    srv = live_server(settings(tmp_path / "s", http_parser=parser, header_timeout_seconds=1.0,
                               timeout_keep_alive_seconds=5))
    with connect(srv.port) as s:
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n")
        time.sleep(0.2)
        s.sendall(b"0123456789")  # ends the request in a read that begins none
        assert read_response(s)[0] == 405
        time.sleep(0.6)
        s.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.6)  # 1.2 s after the body, 0.6 s after this head's first byte
        s.sendall(b"Host: 127.0.0.1\r\n\r\n")
        status, _, body = read_response(s)
        assert status == 200, body


def test_unread_body_trickled_after_the_answer_is_cut_off(live_server, tmp_path, parser):
    """A request answered before its body arrived (here 405) whose client keeps trickling that body (each read
    cancels uvicorn's keep-alive timer, nobody reads the bytes) is closed header_timeout_seconds later."""
    srv = live_server(settings(tmp_path / "s", http_parser=parser, header_timeout_seconds=1.0,
                               timeout_keep_alive_seconds=1))
    with connect(srv.port) as s:
        s.sendall(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\nabc")
        assert read_response(s)[0] == 405
        t0 = time.monotonic()
        trickle(s, b"x", seconds=4, every=0.3)
        assert closed_by_server(s, 3) and time.monotonic() - t0 < 6


def test_invented_methods_do_not_grow_the_metrics(live_server, tmp_path, parser):
    """h11 accepts any token as a method (llhttp a fixed list): the HTTP metrics label the ones outside
    METRIC_METHODS ``other``, so a client inventing methods adds no series."""
    import httpx

    from service.middleware import METRIC_METHODS

    srv = live_server(settings(tmp_path / "s", http_parser=parser))
    for method in ["PROPFIND", "MKCOL", "XYZ1", "XYZ2"]:
        with connect(srv.port) as s:
            s.sendall(f"{method} /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            assert read_response(s)[0] in (400, 405)  # llhttp refuses XYZ*, the app answers the rest
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    methods = {ln.split('method="')[1].split('"')[0] for ln in text.splitlines()
               if ln.startswith("tta_http_requests_total{")}
    assert methods <= METRIC_METHODS | {"other"} and "other" in methods, methods
    other = [ln for ln in text.splitlines()
             if ln.startswith('tta_http_requests_total{method="other",route="/predict",status="405"}')]
    assert len(other) == 1 and float(other[0].split()[-1]) == (4 if parser == "h11" else 2)


def test_pipelined_head_after_a_body_is_bounded_by_its_own_bytes(live_server, tmp_path, parser):
    """A request pipelined behind a 200 KB body, its head begun in the read that ends that body: the body's tail
    does not count towards the incomplete-head bound (the request is served), the head's own bytes do (400)."""
    srv = live_server(settings(tmp_path / "s", http_parser=parser, max_header_bytes=2048, header_timeout_seconds=30))
    body = b"x" * 200_000
    first = b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    with connect(srv.port) as s:
        s.sendall(first + b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.3)
        s.sendall(b"Host: 127.0.0.1\r\n\r\n")
        assert [read_response(s)[0] for _ in range(2)] == [405, 200]
    with connect(srv.port) as s:
        s.sendall(first + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert read_response(s)[0] == 405
        time.sleep(0.3)
        s.sendall(b"X-Pad: " + b"a" * 4096)  # no end of the head: past the bound
        status, _, answer = read_response(s)
        assert status == 400 and json.loads(answer)["error"]["code"] == "bad_http_request" and closed_by_server(s, 5)
