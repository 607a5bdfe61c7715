"""Closed-loop streams of /predict requests against a fresh ``mgg serve``: img/s, client and server CPU per request,
and the server's histogram means from /metrics. Session 9's ``load16x4.py`` generalised (session 10):

* STREAMS (16) streams of IMGS (4) images per request, the first argument requests per stream (a warm-up round on
  other stream ids first);
* FLAGS: more ``mgg serve`` flags; SRVENV: JSON of more server environment variables (``MGG_*`` settings, or
  ``TRACE_OUT`` with ``trace.patch`` applied to the checkout in REPO);
* REPO: the checkout whose ``scripts/`` and service code run (default /work/main);
* PROCS: the client's streams spread over that many processes (0: threads of this process);
* second argument: a py-spy raw profile (GIL=1 only the GIL holder, IDLE=1 idle samples too, NATIVE=1 native frames,
  RATE the sampling rate); ``wall_profile.py`` summarises an IDLE=1 profile per thread.

    STREAMS=16 IMGS=4 HF_HUB_OFFLINE=1 .venv/bin/python docs/results/fused/session10/load.py 40
    STREAMS=2 IMGS=64 HF_HUB_OFFLINE=1 .venv/bin/python docs/results/fused/session10/load.py 20
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(os.environ.get("REPO", "/work/main"))
sys.path[:0] = [str(REPO / "scripts"), str(REPO)]

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from bench_service import npy_body  # noqa: E402  (scripts/)
from benchkit import labelled_digits, start_server  # noqa: E402  (scripts/)


def process_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_round(url: str, bodies: dict[int, list[tuple[bytes, str]]], tag: str) -> tuple[float, float]:
    """All streams at once, each sending its requests one after the other: (wall s, client CPU s)."""
    barrier = threading.Barrier(len(bodies) + 1)

    def stream(sid: str, todo: list[tuple[bytes, str]]) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            barrier.wait()
            for body, ctype in todo:
                c.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": sid}).raise_for_status()

    threads = [threading.Thread(target=stream, args=(f"{tag}-{k}", v)) for k, v in bodies.items()]
    for t in threads:
        t.start()
    barrier.wait()
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, time.process_time() - c0


def _proc(url, items, barrier, q):
    import threading as th
    done = []
    def stream(sid, todo):
        with httpx.Client(base_url=url, timeout=600) as c:
            barrier.wait()
            for body, ctype in todo:
                c.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": sid}).raise_for_status()
    ts = [th.Thread(target=stream, args=it) for it in items]
    for t in ts: t.start()
    for t in ts: t.join()
    q.put(time.process_time())


def run_round_mp(url, bodies, tag, procs):
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(len(bodies) + 1)
    q = ctx.Queue()
    items = [(f"{tag}-{k}", v) for k, v in bodies.items()]
    ps = [ctx.Process(target=_proc, args=(url, items[i::procs], barrier, q)) for i in range(procs)]
    for p in ps: p.start()
    barrier.wait()
    t0 = time.perf_counter()
    cpu = sum(q.get() for _ in ps)
    for p in ps: p.join()
    return time.perf_counter() - t0, cpu


def histogram_means(url: str) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[tuple, dict[str, float]] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count")):
                base, kind = s.name.rsplit("_", 1)
                sums.setdefault((base, tuple(sorted(s.labels.items()))), {})[kind] = s.value
    out = []
    for (name, labels), v in sorted(sums.items()):
        if v.get("count"):
            mean = v["sum"] / v["count"] * (1000 if "seconds" in name else 1)
            out.append(f"{name} {dict(labels)}: n={v['count']:.0f} mean={mean:.2f}")
    return out


def main() -> int:
    nreq = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    spy = sys.argv[2] if len(sys.argv) > 2 else ""
    server_args = argparse.Namespace(model="resnet", device="cpu", batch_size=64, method=None, optimizer=None,
                                     lr=None, mgg_checkpoint=None)
    with tempfile.TemporaryDirectory() as snaps:
        import json
        srv = start_server(server_args, snaps, "--fused-steps", *os.environ.get("FLAGS", "").split(), env=json.loads(os.environ.get("SRVENV", "{}")))
        S, B = int(os.environ.get("STREAMS", 16)), int(os.environ.get("IMGS", 4))
        bodies = {k: [npy_body(x) for x in np.split(labelled_digits(B * nreq, seed=k)[0], nreq)] for k in range(S)}
        P = int(os.environ.get("PROCS", "0"))
        if P:
            global run_round
            run_round = lambda u, b, t: run_round_mp(u, b, t, P)  # noqa: E731
        run_round(srv.url, bodies, "warm")
        prof = None
        if spy:
            cmd = [str(REPO / ".venv" / "bin" / "py-spy"), "record", "-p", str(srv.process.pid), "-f", "raw", "-o",
                   spy, "-r", os.environ.get("RATE", "100"), "--threads"]
            cmd += ["--native"] if os.environ.get("NATIVE") else ["--nonblocking"]
            cmd += ["--gil"] if os.environ.get("GIL") else []
            cmd += ["--idle"] if os.environ.get("IDLE") else []
            prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        s0 = process_cpu(srv.process.pid)
        wall, client = run_round(srv.url, bodies, "meas")
        server = process_cpu(srv.process.pid) - s0
        if prof is not None:
            prof.send_signal(2)
            prof.wait()
        n = S * nreq
        print(f"{B * n / wall:.1f} img/s wall {wall:.2f}s; client cpu {client:.2f}s ({1000 * client / n:.1f} ms/req), "
              f"server cpu {server:.2f}s ({1000 * server / n:.1f} ms/req)")
        print("\n".join(histogram_means(srv.url)))
        srv.stop(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
