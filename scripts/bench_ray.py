"""Benchmark the Ray Serve backend against the single-process service (same model, same load, one machine).

Load: ``--streams`` concurrent streams, each sending ``--requests`` adapted ``/predict`` batches of ``--batch``
random 28x28 uint8 images (pre-encoded .npy, so the client costs little), after ``--warmup`` batches per stream.
Modes: ``single`` (``uvicorn service.app:create_app`` in a subprocess), ``ray1`` and ``ray2`` (the Ray backend with
1 and 2 shard replicas on a local cluster of ``--num-cpus`` CPUs). Prints img/s, p50/p99 latency per mode, the
ray1/single ratios (the overhead of the Ray path: ingress hop + routing + lease + a snapshot after every step)
and ray2/ray1; ``--out`` writes them as JSON with the protocol.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/bench_ray.py --out docs/results/bench_ray.json
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bodies(n: int, batch: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        np.save(buf, rng.integers(0, 256, (batch, 28, 28), dtype=np.uint8))
        out.append(buf.getvalue())
    return out


def load(url: str, streams: int, requests: int, warmup: int, batch: int, tag: str) -> dict[str, Any]:
    """Each stream in its own thread: warm-up batches (not timed), then ``requests`` timed batches."""
    import httpx

    lat: list[float] = []
    served: dict[str, set[str]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(streams + 1)

    def run(i: int) -> None:
        sid = f"{tag}-{i}"
        data = bodies(warmup + requests, batch, seed=i)
        headers = {"X-Stream-Id": sid, "Content-Type": "application/x-npy"}
        with httpx.Client(base_url=url, timeout=120) as c:
            c.post("/reset", json={"stream_id": sid})
            for b in data[:warmup]:
                c.post("/predict", content=b, headers=headers)
            barrier.wait()
            for b in data[warmup:]:
                t = time.perf_counter()
                r = c.post("/predict", content=b, headers=headers)
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                    lat.append(dt)
                    served.setdefault(sid, set()).add(r.headers.get("X-Served-By", "-"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000
    return {"img_s": streams * requests * batch / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(lat), "errors": errors[:5],
            "error_count": len(errors), "wall_s": wall,
            "replicas_used": sorted({r for v in served.values() for r in v}),
            "streams_on_one_replica": all(len(v) == 1 for v in served.values())}


def bench_single(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from service.replay import LocalServer

    env = {"MGG_MODEL": args.model, "MGG_DEVICE": "cpu", "MGG_TORCH_THREADS": str(args.torch_threads),
           "MGG_SNAPSHOT_DIR": str(tmp / "single"), "MGG_MAX_CONCURRENT_STREAMS": str(args.streams)}
    with LocalServer(env, log_path=tmp / "single.log") as srv:
        return load(srv.url, args.streams, args.requests, args.warmup, args.batch, "single")


def bench_ray(args: argparse.Namespace, tmp: Path, replicas: int, port: int) -> dict[str, Any]:
    """Deploy with ``replicas`` shards (Serve's HTTP proxy keeps the port of its first start: reuse one)."""
    from ray import serve

    from service.rayserve.app import start
    from service.rayserve.settings import RaySettings
    from service.settings import ServiceSettings

    settings = ServiceSettings(model=args.model, device="cpu", torch_threads=args.torch_threads, port=port,
                               snapshot_dir=tmp / f"ray{replicas}", max_concurrent_streams=args.streams)
    start(settings, RaySettings(num_cpus=args.num_cpus, replicas=replicas,
                                replica_num_cpus=min(1.0, args.num_cpus / (replicas + 0.5))))
    try:
        return load(f"http://127.0.0.1:{port}", args.streams, args.requests, args.warmup, args.batch, f"ray{replicas}")
    finally:
        serve.delete("mgg")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--requests", type=int, default=15, help="timed batches per stream")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--torch-threads", type=int, default=1, help="per server process / replica")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--modes", default="single,ray1,ray2")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    from service.replay import free_port

    results: dict[str, Any] = {}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as d:
        tmp = Path(d)
        for mode in args.modes.split(","):
            t = time.perf_counter()
            results[mode] = bench_single(args, tmp) if mode == "single" else bench_ray(args, tmp, int(mode[3:]), port)
            r = results[mode]
            print(f"{mode:7s} {r['img_s']:8.1f} img/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                  f"errors {r['error_count']}  replicas {len(r['replicas_used'])}  "
                  f"pinned {r['streams_on_one_replica']}  ({time.perf_counter() - t:.0f}s incl. start-up)",
                  flush=True)
    ratios = {}
    if "single" in results and "ray1" in results:
        s, r1 = results["single"], results["ray1"]
        ratios["ray1_over_single_img_s"] = r1["img_s"] / s["img_s"]
        ratios["ray1_minus_single_p50_ms"] = r1["p50_ms"] - s["p50_ms"]
        ratios["ray1_over_single_p50"] = r1["p50_ms"] / s["p50_ms"]
    if "ray1" in results and "ray2" in results:
        ratios["ray2_over_ray1_img_s"] = results["ray2"]["img_s"] / results["ray1"]["img_s"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if args.out:
        import ray

        protocol = {**vars(args), "images": "random uint8 28x28, .npy bodies", "python": sys.version.split()[0],
                    "ray": ray.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "command": " ".join(sys.argv)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"protocol": protocol, "results": results, "ratios": ratios},
                                             indent=1, default=str))
    return 0 if all(r["error_count"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
