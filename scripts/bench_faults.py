"""Fault benchmarks of `mgg serve` (loopback only, each bounded): the numbers behind issue 13.

Each scenario starts its own `mgg serve` subprocess (the bundled ResNet on CPU, default method FOA + MGG unless
--method is given), measures, and stops it. ``--code DIR`` runs the server from another checkout (e.g. the code
before the fix, ``git archive <commit> | tar -x -C DIR``) with this venv's packages, for before/after numbers.

    python scripts/bench_faults.py bomb crash cost silent hangup           # this checkout
    python scripts/bench_faults.py --code /tmp/before-code bomb crash ...  # another checkout

Scenarios:
  bomb    RSS of the server before / peak / after one 1 MB request of 64 single-colour 4096x4096 PNGs
  crash   8 streams x 16 acknowledged steps, kill -9, restart: steps lost (acknowledged - restored)
  cost    median /predict latency, durability 'step' vs 'interval' (and the snapshot phase's share of it)
  silent  256 header-only /predict connections, then one request on another stream: status and latency;
          seconds until the silent connections are closed by the server
  hangup  10 clients that hang up mid-upload: change of the 5xx request counter
  flood   400 new stream ids under max_streams=100: answers, streams known, snapshot bytes on disk
  retry   10 keyed requests whose client hangs up after sending the body, each retried with the same
          Idempotency-Key: steps applied per logical request
  slowloris  64 connections sending their request head one byte every 0.5 s for 15 s: how many the server closes
          (and when), and a normal request's status and latency meanwhile
Prints one JSON object per scenario.
"""
from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from mgg_replay.server import ServerProcess, kill9_restart

BOOT = (
    "import sys, runpy\n"
    "code = sys.argv.pop(1)\n"
    "if code != '-':\n"
    "    sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
    "(getattr(f, '__module__', '') or getattr(type(f), '__module__', ''))]\n"
    "    sys.path.insert(0, code)\n"
    "from mgg_core.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


class Server(ServerProcess):
    """`mgg serve` from the checkout ``code`` ('-': this one) on a free port, started and ready; its output goes to
    a temporary log file."""

    def __init__(self, code: str, snapshots: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        def command(port: int) -> list[str]:
            return [sys.executable, "-c", BOOT, code, "serve", "--host", "127.0.0.1", "--port", str(port),
                    "--device", "cpu", "--snapshot-dir", str(snapshots), "--log-level", "warning", *args]

        log = tempfile.NamedTemporaryFile(suffix=".log", delete=False)  # noqa: SIM115 - a name for the server
        log.close()
        super().__init__(command, {"HF_HUB_OFFLINE": "1", **(env or {})}, ready_timeout=300, log_path=log.name)
        self.start()

    @property
    def proc(self) -> subprocess.Popen:
        assert self.process is not None, "not started"
        return self.process

    def rss_mb(self, field: str = "VmRSS") -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def reset_peak(self) -> None:
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def digits(n: int = 16, seed: int = 0) -> np.ndarray:
    from mgg_core.data.sources import mnist5k

    src = mnist5k("test")
    idx = np.random.default_rng(seed).choice(len(src), n, replace=False)
    return np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8)


NPY = {"Content-Type": "application/x-npy"}


def bomb_body() -> tuple[bytes, str]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4096, 4096), 7).save(buf, format="PNG", optimize=True)
    png = buf.getvalue()
    boundary = "bOmB"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
             f"Content-Type: image/png\r\n\r\n".encode() + png + b"\r\n" for i in range(64)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def scenario_bomb(code: str, base: list[str], tmp: Path) -> dict:
    srv = Server(code, tmp / "bomb", [*base, "--max-body-bytes", str(8 * 1024 * 1024)])
    try:
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            c.post("/predict", content=npy(digits(4)), headers={**NPY, "X-Stream-Id": "warm"})
            body, ctype = bomb_body()
            before = srv.rss_mb()
            srv.reset_peak()
            t0 = time.perf_counter()
            r = c.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": "bomb"})
            dt = time.perf_counter() - t0
            peak = srv.rss_mb("VmHWM")
            time.sleep(1.0)
            after = srv.rss_mb()
        return {"scenario": "bomb", "body_bytes": len(body), "status": r.status_code,
                "error_code": (r.json().get("error") or {}).get("code") if r.status_code != 200 else None,
                "latency_s": round(dt, 3), "rss_before_mb": round(before, 1), "rss_peak_mb": round(peak, 1),
                "rss_after_mb": round(after, 1), "rss_rise_peak_mb": round(peak - before, 1)}
    finally:
        srv.stop()


def scenario_crash(code: str, base: list[str], tmp: Path, streams: int = 8, steps: int = 16) -> dict:
    snaps = tmp / "crash"

    def drive(c: httpx.Client) -> dict[str, int]:
        acked: dict[str, int] = {}
        for k in range(steps):
            for s in range(streams):
                r = c.post("/predict", content=npy(digits(8, seed=100 * s + k)),
                           headers={**NPY, "X-Stream-Id": f"s{s}"})
                if r.status_code == 200:
                    acked[f"s{s}"] = r.json()["step"]
        return acked

    def restored(c: httpx.Client, acked: dict[str, int]) -> tuple[dict[str, int], dict[str, int | None]]:
        found = {}
        for sid in acked:
            r = c.get(f"/streams/{sid}")
            found[sid] = r.json().get("step") if r.status_code == 200 else None
        return acked, found

    acked, found = kill9_restart(lambda: Server(code, snaps, base), drive, restored)
    lost = sum(a - (found[s] or 0) for s, a in acked.items())
    return {"scenario": "crash", "streams": streams, "acknowledged_steps": sum(acked.values()),
            "lost_steps": lost, "streams_unknown_after_restart": sum(v is None for v in found.values())}


def _phase_mean(url: str, phase: str) -> float | None:
    text = httpx.get(url + "/metrics").text
    vals = {}
    for line in text.splitlines():
        for kind in ("sum", "count"):
            if line.startswith(f"tta_phase_duration_seconds_{kind}{{phase=\"{phase}\"}}"):
                vals[kind] = float(line.split()[-1])
    return vals["sum"] / vals["count"] if vals.get("count") else None


def scenario_cost(code: str, base: list[str], tmp: Path, n: int = 60) -> dict:
    """Two servers at once, durability 'step' and 'interval' (no write within the run), requests alternating
    between them so that both see the same machine load; the ratio of their median latencies is the cost."""
    servers = {}
    try:
        for mode in ("interval", "step"):
            env = {"MGG_DURABILITY": mode, "MGG_SNAPSHOT_INTERVAL_STEPS": "1000000",
                   "MGG_SNAPSHOT_INTERVAL_SECONDS": "3600"}
            servers[mode] = Server(code, tmp / f"cost-{mode}", base, env)
        body = npy(digits(16))
        lat: dict[str, list[float]] = {m: [] for m in servers}
        clients = {m: httpx.Client(base_url=srv.url, timeout=120) for m, srv in servers.items()}
        for i in range(n + 5):
            for mode, c in clients.items():
                t0 = time.perf_counter()
                r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": "cost"})
                if i >= 5:
                    lat[mode].append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        out: dict = {"scenario": "cost", "requests_each": n}
        for mode, srv in servers.items():
            out[f"median_latency_ms_{mode}"] = round(1000 * statistics.median(lat[mode]), 2)
            snap = _phase_mean(srv.url, "snapshot")
            out[f"snapshot_ms_mean_{mode}"] = None if snap is None else round(1000 * snap, 2)
        for c in clients.values():
            c.close()
    finally:
        for srv in servers.values():
            srv.stop()
    step, interval = out["median_latency_ms_step"], out["median_latency_ms_interval"]
    out["latency_ratio_step_over_interval"] = round(step / interval, 3)
    if out.get("snapshot_ms_mean_step"):
        out["snapshot_share_of_request_step"] = round(out["snapshot_ms_mean_step"] / step, 3)
    return out


def scenario_silent(code: str, base: list[str], tmp: Path, n: int = 256) -> dict:
    srv = Server(code, tmp / "silent", base)
    socks = []
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            c.post("/predict", content=npy(digits(4)), headers={**NPY, "X-Stream-Id": "warm"})
            t0 = time.perf_counter()
            c.post("/predict", content=npy(digits(4)), headers={**NPY, "X-Stream-Id": "baseline"})
            baseline = time.perf_counter() - t0
            for i in range(n):
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
                s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                          f"X-Stream-Id: silent{i}\r\nContent-Length: 100000\r\n\r\n".encode())
                socks.append(s)
            time.sleep(2.0)  # let the server take in the 256 requests' headers first
            lat, status = [], None
            for _ in range(2):  # a new stream, then the same stream again
                t0 = time.perf_counter()
                try:
                    r = c.post("/predict", content=npy(digits(4)), headers={**NPY, "X-Stream-Id": "other"},
                               timeout=30)
                    status = r.status_code if status in (None, 200) else status
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                lat.append(time.perf_counter() - t0)
            dt = lat[0]
        closed_at: list[float] = []
        t1 = time.perf_counter()

        def watch(s: socket.socket) -> None:
            s.settimeout(max(0.1, 60 - (time.perf_counter() - t1)))
            try:
                while s.recv(65536):
                    pass
                closed_at.append(time.perf_counter() - t1)
            except OSError:
                pass

        threads = [threading.Thread(target=watch, args=(s,)) for s in socks]
        for t in threads:
            t.start()
        for t in threads:
            t.join(65)
        return {"scenario": "silent", "connections": n, "new_stream_latency_s_without_them": round(baseline, 3),
                "other_stream_status": status, "other_stream_latency_s": round(dt, 3),
                "other_stream_second_request_s": round(lat[1], 3),
                "silent_closed_by_server": len(closed_at),
                "silent_closed_within_s": round(max(closed_at), 2) if closed_at else None}
    finally:
        for s in socks:
            s.close()
        srv.stop()


def _server_errors(url: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("tta_http_requests_total{") and 'status="5' in line:
            total += float(line.split()[-1])
    return total


def scenario_hangup(code: str, base: list[str], tmp: Path, n: int = 10) -> dict:
    srv = Server(code, tmp / "hangup", base)
    try:
        before = _server_errors(srv.url)
        body = npy(digits(8))
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            s.sendall(f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\n"
                      f"X-Stream-Id: h{i}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
            time.sleep(0.1)
            s.close()
        time.sleep(1.0)
        after = _server_errors(srv.url)
        log = Path(str(srv.log_path)).read_text()
        return {"scenario": "hangup", "hangups": n, "server_error_count_change": after - before,
                "tracebacks_in_log": log.count("Traceback")}
    finally:
        srv.stop()


def scenario_flood(code: str, base: list[str], tmp: Path, n: int = 400, cap: int = 100) -> dict:
    """n new stream ids, one request each, under a 1 MB state budget and max_streams=cap (ignored by old code)."""
    snaps = tmp / "flood"
    env = {"MGG_STATE_BUDGET_BYTES": str(1024 * 1024), "MGG_MAX_STREAMS": str(cap)}
    srv = Server(code, snaps, base, env)
    codes: dict[int, int] = {}
    try:
        body = npy(digits(2))
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i in range(n):
                r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": f"flood{i}"})
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
            known = c.get("/streams", params={"limit": 1}).json().get("streams_known")
        disk = sum(p.stat().st_size for p in snaps.rglob("*") if p.is_file())
    finally:
        srv.stop()
    disk_after_stop = sum(p.stat().st_size for p in snaps.rglob("*") if p.is_file())
    return {"scenario": "flood", "new_stream_ids": n, "max_streams": cap, "status_counts": codes,
            "streams_known": known, "snapshot_bytes_on_disk": disk, "snapshot_bytes_after_shutdown": disk_after_stop}


def _stepped_requests(url: str, sid: str) -> int:
    """Requests the stream has been stepped on (its ``requests`` count; ``step`` would not do: the collapse guard
    may roll a stream back)."""
    r = httpx.get(f"{url}/streams/{sid}", timeout=30)
    return int(r.json().get("requests") or 0) if r.status_code == 200 else 0


def scenario_retry(code: str, base: list[str], tmp: Path, n: int = 10) -> dict:
    """n requests, each with an Idempotency-Key: the client hangs up once its body is in (0.5 s after sending it),
    then retries the same request with the same key; steps applied per logical request (1 = no double step)."""
    srv = Server(code, tmp / "retry", [*base, "--durability", "step"], {"MGG_UPDATE_IMAGES": "1"})
    try:
        replayed = 0
        for i in range(n):
            body = npy(digits(8, seed=i))
            head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-npy\r\nX-Stream-Id: r\r\n"
                    f"Idempotency-Key: req-{i}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(head + body)
                time.sleep(0.5)  # the body has arrived; the client gives up before reading the answer
            r = httpx.post(srv.url + "/predict", content=body, timeout=120,
                           headers={**NPY, "X-Stream-Id": "r", "Idempotency-Key": f"req-{i}"})
            replayed += r.headers.get("Idempotent-Replayed") == "true"
        steps = _stepped_requests(srv.url, "r")
        return {"scenario": "retry", "logical_requests": n, "steps_applied": steps, "replayed_retries": replayed,
                "steps_per_request": round(steps / n, 2)}
    finally:
        srv.stop()


def scenario_slowloris(code: str, base: list[str], tmp: Path, n: int = 64, watch: float = 15.0) -> dict:
    """n connections that send their request head one byte every 0.5 s; after ``watch`` seconds: how many the
    server has closed, and the status and latency of a normal request sent meanwhile."""
    srv = Server(code, tmp / "slowloris", base)
    socks, closed_at = [], {}
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
            s.setblocking(False)
            socks.append(s)
        head = b"POST /predict HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 200
        t0 = time.monotonic()
        probe: dict = {}
        k = 0
        while time.monotonic() - t0 < watch:
            for i, s in enumerate(socks):
                if i in closed_at:
                    continue
                try:
                    s.send(head[k % len(head):k % len(head) + 1])
                    s.recv(4096)  # an answer (408) or the close: the server cut this connection
                    closed_at[i] = time.monotonic() - t0
                except BlockingIOError:
                    pass
                except OSError:
                    closed_at[i] = time.monotonic() - t0
            if not probe and time.monotonic() - t0 > 2:
                t1 = time.perf_counter()
                r = httpx.post(srv.url + "/predict", content=npy(digits(4)), headers={**NPY, "X-Stream-Id": "p"},
                               timeout=60)
                probe = {"probe_status": r.status_code, "probe_latency_s": round(time.perf_counter() - t1, 3)}
            k += 1
            time.sleep(0.5)
        cut = sorted(closed_at.values())
        return {"scenario": "slowloris", "connections": n, "watch_s": watch, "closed_by_server": len(cut),
                "first_closed_s": round(cut[0], 1) if cut else None,
                "last_closed_s": round(cut[-1], 1) if cut else None, **probe}
    finally:
        for s in socks:
            s.close()
        srv.stop()


SCENARIOS = {"bomb": scenario_bomb, "crash": scenario_crash, "cost": scenario_cost, "silent": scenario_silent,
             "hangup": scenario_hangup, "flood": scenario_flood, "retry": scenario_retry,
             "slowloris": scenario_slowloris}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="+", choices=sorted(SCENARIOS))
    ap.add_argument("--code", default="-", help="run the server from this checkout (default: this one)")
    ap.add_argument("--method", default=None, help="adaptation method (default: the server's, FOA + MGG)")
    ap.add_argument("--torch-threads", default="1")
    args = ap.parse_args()
    base = ["--torch-threads", args.torch_threads]
    if args.method:
        base += ["--method", args.method]
    with tempfile.TemporaryDirectory(prefix="mgg-faults-") as tmp:
        for name in args.scenarios:
            print(json.dumps({"code": args.code, **SCENARIOS[name](args.code, base, Path(tmp))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
