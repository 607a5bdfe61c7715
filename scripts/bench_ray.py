"""Benchmark the Ray Serve backend against the single-process service (same model, same load, one machine).

Load: ``--streams`` concurrent streams, each sending ``--requests`` adapted ``/predict`` batches of ``--batch``
random 28x28 uint8 images (pre-encoded .npy, so the client costs little), after ``--warmup`` batches per stream.
Modes: ``single`` (``uvicorn service.app:create_app`` in a subprocess), ``ray1`` and ``ray2`` (the Ray backend with
1, then 2 shard replicas on a local cluster of ``--num-cpus`` CPUs). The machine is shared, so rounds alternate
single and Ray loads and the ratios are taken per round (median over ``--rounds``). Prints img/s and p50/p99
latency per mode, ray1/single (the overhead of the Ray path: ingress hop + routing + lease; both sides snapshot
every step), ray2/single and ray2/ray1; ``--out`` writes them as JSON with the protocol.

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
from benchkit import run_together  # scripts/benchkit.py (scripts/ is on sys.path when this script runs)

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
    phases: dict[str, list[float]] = {}
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
                    else:
                        for k, v in r.json().get("timings", {}).items():
                            phases.setdefault(k, []).append(float(v))
                    lat.append(dt)
                    served.setdefault(sid, set()).add(r.headers.get("X-Served-By", "-"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    wall = run_together(threads, barrier)
    ms = np.asarray(lat) * 1000
    return {"img_s": streams * requests * batch / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "requests": len(lat),
            "phase_p50_ms": {k: float(np.median(v)) * 1000 for k, v in sorted(phases.items())}, "errors": errors[:5],
            "error_count": len(errors), "wall_s": wall,
            "replicas_used": sorted({r for v in served.values() for r in v}),
            "streams_on_one_replica": all(len(v) == 1 for v in served.values())}


def ray_deploy(args: argparse.Namespace, tmp: Path, replicas: int, port: int) -> str:
    """Deploy (or redeploy in place) the Ray backend with ``replicas`` shards; returns its URL."""
    from service.rayserve.app import start
    from service.rayserve.settings import RaySettings
    from service.settings import ServiceSettings

    settings = ServiceSettings(model=args.model, device="cpu", torch_threads=args.torch_threads, port=port,
                               snapshot_dir=tmp / "ray", max_concurrent_streams=args.streams)
    start(settings, RaySettings(num_cpus=args.num_cpus, replicas=replicas,
                                replica_num_cpus=min(1.0, args.num_cpus / (replicas + 0.5))))
    return f"http://127.0.0.1:{port}"


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = {k: float(np.median([r[k] for r in runs])) for k in ("img_s", "p50_ms", "p99_ms")}
    phases = {k: float(np.median([r["phase_p50_ms"][k] for r in runs if k in r["phase_p50_ms"]]))
              for k in sorted({k for r in runs for k in r["phase_p50_ms"]})}
    return {**med, "phase_p50_ms": phases, "rounds": runs, "error_count": sum(r["error_count"] for r in runs),
            "replicas_used": sorted({x for r in runs for x in r["replicas_used"]}),
            "streams_on_one_replica": all(r["streams_on_one_replica"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--requests", type=int, default=12, help="timed batches per stream and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="alternating single/ray rounds per replica count")
    p.add_argument("--torch-threads", type=int, default=1, help="per server process / replica")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    from mgg_replay.server import LocalServer, free_port

    runs: dict[str, list[dict[str, Any]]] = {"single": [], "ray1": [], "ray2": []}
    pair: dict[str, list[float]] = {"ray1": [], "ray2": []}  # ray img/s over single img/s, per round
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as d:
        tmp = Path(d)
        env = {"MGG_MODEL": args.model, "MGG_DEVICE": "cpu", "MGG_TORCH_THREADS": str(args.torch_threads),
               "MGG_SNAPSHOT_DIR": str(tmp / "single"), "MGG_MAX_CONCURRENT_STREAMS": str(args.streams)}
        with LocalServer(env, log_path=tmp / "single.log") as single:
            for mode, replicas in (("ray1", 1), ("ray2", 2)):
                url = ray_deploy(args, tmp, replicas, port)
                for rnd in range(args.rounds):  # alternate, so that load from elsewhere hits both alike
                    tag = f"{mode}-r{rnd}"
                    s = load(single.url, args.streams, args.requests, args.warmup, args.batch, f"single-{tag}")
                    r = load(url, args.streams, args.requests, args.warmup, args.batch, tag)
                    runs["single"].append(s)
                    runs[mode].append(r)
                    pair[mode].append(r["img_s"] / s["img_s"])
                    print(f"{tag}: single {s['img_s']:6.1f} img/s p50 {s['p50_ms']:6.1f} ms | {mode} "
                          f"{r['img_s']:6.1f} img/s p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms, replicas "
                          f"{len(r['replicas_used'])}, pinned {r['streams_on_one_replica']}", flush=True)
    results = {k: summary(v) for k, v in runs.items() if v}
    for k, r in results.items():
        print(f"{k:7s} median {r['img_s']:7.1f} img/s  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
              f"errors {r['error_count']}  replicas {len(r['replicas_used'])}  pinned {r['streams_on_one_replica']}")
        print("        phase p50 ms: " + ", ".join(f"{k} {v:.1f}" for k, v in r["phase_p50_ms"].items()))
    ratios = {
        "ray1_over_single_img_s": float(np.median(pair["ray1"])),
        "ray2_over_single_img_s": float(np.median(pair["ray2"])),
        "ray1_minus_single_p50_ms": results["ray1"]["p50_ms"] - results["single"]["p50_ms"],
    }
    ratios["ray2_over_ray1_img_s"] = ratios["ray2_over_single_img_s"] / ratios["ray1_over_single_img_s"]
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}")
    if args.out:
        import ray

        protocol = {**vars(args), "images": "random uint8 28x28, .npy bodies", "python": sys.version.split()[0],
                    "ray": ray.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "command": " ".join(["scripts/bench_ray.py", *(argv if argv is not None else sys.argv[1:])]),
                    "method": "model's default (foa + mgg); durability 'step' (the default) on both servers"}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"protocol": protocol, "results": results, "ratios": ratios},
                                             indent=1, default=str))
    return 0 if all(r["error_count"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
