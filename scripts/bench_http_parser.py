#!/usr/bin/env python
"""Server CPU per request of the HTTP stack, per ``http_parser`` (issue 10: many small requests share one event loop).

Starts ``mgg serve`` once per parser and round (the default service, the bundled ResNet), sends ``--requests``
sequential keep-alive ``GET /healthz`` requests from one stdlib ``http.client`` connection (the route does no
work of its own, so the server's CPU per request is the HTTP stack's: parser, protocol, Starlette/FastAPI, our
middleware), and reads the server process's CPU time from ``/proc`` (Linux). Parsers alternate round by round;
prints each round and the median ratio httptools / h11. A benchmark, not a test: the numbers depend on the machine.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_http_parser.py --rounds 3
"""
from __future__ import annotations

import argparse
import http.client
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchkit import start_server  # noqa: E402  (scripts/benchkit.py)

PARSERS = ("h11", "httptools")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(parser: str, requests: int) -> tuple[float, float]:
    """(server CPU ms per request, requests per second) of one fresh server with ``parser``."""
    server_args = argparse.Namespace(model="resnet", device="cpu", batch_size=64, method=None, optimizer=None,
                                     lr=None, mgg_checkpoint=None)
    with tempfile.TemporaryDirectory() as snaps:
        srv = start_server(server_args, snaps, "--http-parser", parser)
        try:
            url = urllib.parse.urlparse(srv.url)
            conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            headers = {"X-Stream-Id": "bench", "Content-Type": "application/x-npy"}
            for _ in range(200):  # warm-up
                conn.request("GET", "/healthz", headers=headers)
                conn.getresponse().read()
            c0, t0 = process_cpu(srv.process.pid), time.perf_counter()
            for _ in range(requests):
                conn.request("GET", "/healthz", headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"GET /healthz answered {resp.status}")
            wall, cpu = time.perf_counter() - t0, process_cpu(srv.process.pid) - c0
            conn.close()
        finally:
            srv.stop(timeout=30)
    return 1000 * cpu / requests, requests / wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds (each parser once per round)")
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per round and parser")
    args = ap.parse_args(argv)
    cpu: dict[str, list[float]] = {p: [] for p in PARSERS}
    for r in range(args.rounds):
        for parser in PARSERS:
            ms, rate = one_round(parser, args.requests)
            cpu[parser].append(ms)
            print(f"round {r + 1} {parser:9s}: {ms:.3f} ms server CPU per request, {rate:.0f} requests/s",
                  flush=True)
    ratios = [a / b for a, b in zip(cpu["httptools"], cpu["h11"], strict=True)]
    print(f"median server CPU per request: h11 {statistics.median(cpu['h11']):.3f} ms, httptools "
          f"{statistics.median(cpu['httptools']):.3f} ms; httptools / h11 {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
