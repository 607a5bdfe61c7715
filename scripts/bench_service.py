#!/usr/bin/env python
"""Throughput of adapted /predict (HTTP, `mgg serve` in its own process).

``--mode inprocess`` (the default): HTTP vs the same adapt loop in-process.

The in-process loop is what the server does per request minus HTTP: preprocess the uint8 batch with the model's
own data config, then ``engine.step(state, x)`` on one stream. The service is measured with sequential requests
on one stream (batches of one stream are applied one at a time anyway), bodies encoded before timing, for
multipart PNG and for application/x-npy. Prints images/s and the ratio service / in-process.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_service.py --model resnet --batch-size 64 --batches 40

``--mode mixed``: many small streams next to few big ones on the default service, fused steps off vs on
(16 concurrent streams of 4-image requests vs 2 streams of 64-image requests: img/s, p50/p99 latency, stream 0's
accuracy among the 16 vs alone); see run_mixed.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/bench_service.py --mode mixed --out docs/results/fused

``--mode think``: the latency cost of waiting for other streams when clients pause between an answer and their next
request (closed loop with think time, 16 streams, think time uniform(0.5, 1.5) x --think-ms, the same sequence for
every config): request p50/p99, mean queue wait, streams per fused step, per config.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_service.py --mode think --configs on/d5,on --rounds 2
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from benchkit import add_server_args, digits, run_together, start_server  # noqa: E402  (scripts/benchkit.py)


def png_multipart(batch: np.ndarray) -> tuple[bytes, str]:
    from PIL import Image

    boundary = "benchBoundary7MA4YWxkTrZu0gW"
    out = io.BytesIO()
    for i, a in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                  f"Content-Type: image/png\r\n\r\n".encode())
        out.write(buf.getvalue() + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def npy_body(batch: np.ndarray) -> tuple[bytes, str]:
    buf = io.BytesIO()
    np.save(buf, batch, allow_pickle=False)
    return buf.getvalue(), "application/x-npy"


class InProcess:
    """The adapt loop without HTTP: preprocess + engine.step on one stream, same settings as the server."""

    def __init__(self, settings, warmup_batches: list[np.ndarray]) -> None:
        from service.app import load_runtime

        self.rt = load_runtime(settings)
        self._run(warmup_batches)

    def run(self, batches: list[np.ndarray]) -> dict[str, float]:
        """Runs in a worker thread, like the server's steps (asyncio.to_thread): on a busy CPU, torch's
        intra-op threading behaves very differently in the main thread, which would skew the ratio."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(self._run, batches).result()

    def _run(self, batches: list[np.ndarray]) -> dict[str, float]:
        import torch

        rt = self.rt
        state = rt.engine.new_state()
        n_img, t_pre, t_step = 0, 0.0, 0.0
        for b in batches:
            t0 = time.perf_counter()
            x = rt.preprocessor(b).to(rt.device)
            t1 = time.perf_counter()
            rt.engine.step(state, x)
            if rt.device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            t_pre += t1 - t0
            t_step += t2 - t1
            n_img += len(b)
        return {"images": n_img, "seconds": t_pre + t_step, "img_s": n_img / (t_pre + t_step),
                "step_only_img_s": n_img / t_step}


def over_http(client, bodies: list[tuple[bytes, str]], n_images: list[int], stream: str) -> dict[str, float]:
    """Sequential adapted /predict requests on one fresh stream."""
    t0 = time.perf_counter()
    steps = 0
    for body, ctype in bodies:
        r = client.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": stream})
        r.raise_for_status()
        steps += int(r.json()["adapted"])
    dt = time.perf_counter() - t0
    n = sum(n_images)
    return {"images": n, "seconds": dt, "img_s": n / dt, "adapted_batches": steps}

# ------------------------------------------------------------------------------------------------ --mode mixed

def add_mixed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("--mode mixed")
    g.add_argument("--small-streams", type=int, default=16)
    g.add_argument("--small-images", type=int, default=4, help="images per request of the small streams")
    g.add_argument("--small-requests", type=int, default=12, help="requests per small stream and round")
    g.add_argument("--big-streams", type=int, default=2)
    g.add_argument("--big-images", type=int, default=64)
    g.add_argument("--big-requests", type=int, default=6, help="requests per big stream and round")
    g.add_argument("--configs", default="off,on", help="comma-separated: off (--no-fused-steps), on (the default "
                   "scheduler), on/d<ms>/c<n> (on with that max_batch_delay_ms and max_concurrent_streams)")
    g.add_argument("--lone-requests", type=int, default=40, help="requests of a lone stream, interleaved one by one "
                   "between the configs' servers (per request size: small-images and big-images)")
    g.add_argument("--out", default=None, help="folder for mixed.json and mixed.md (e.g. docs/results/fused)")


def _stream_data(args: argparse.Namespace, k: int, images: int, requests: int) -> tuple[list, list]:
    """Stream k's requests (its own slice of the test digits) and their labels."""
    from benchkit import labelled_digits

    x, y = labelled_digits(images * requests, seed=k)
    return ([x[i * images:(i + 1) * images] for i in range(requests)],
            [y[i * images:(i + 1) * images] for i in range(requests)])


def _concurrent(url: str, streams: dict[str, list[tuple[bytes, str]]], think_s: float = 0.0) -> dict[str, Any]:
    """Every stream sends its requests one after the other, all streams at once; img/s over the wall time,
    per-request latencies, and each stream's predicted labels. ``think_s`` > 0: after each answer a stream waits
    uniform(0.5, 1.5) x ``think_s`` before its next request (numpy default_rng(crc32 of the id's last two parts,
    e.g. "r0-s3": the same sequence for every config))."""
    import threading
    import zlib

    import httpx

    barrier = threading.Barrier(len(streams) + 1, timeout=600)
    lat: list[float] = []
    labels: dict[str, list[int]] = {}
    errors: list[str] = []

    def run(sid: str, bodies: list[tuple[bytes, str]]) -> None:
        out: list[int] = []
        rng = np.random.default_rng(zlib.crc32("-".join(sid.rsplit("-", 2)[-2:]).encode()))  # round + stream
        with httpx.Client(base_url=url, timeout=600) as c:
            barrier.wait()
            for i, (body, ctype) in enumerate(bodies):
                if think_s > 0 and i:
                    time.sleep(think_s * rng.uniform(0.5, 1.5))
                t0 = time.perf_counter()
                r = c.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": sid})
                lat.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors.append(f"{sid}: {r.status_code} {r.text[:200]}")
                    return
                out += [p["label"] for p in r.json()["predictions"]]
        labels[sid] = out

    threads = [threading.Thread(target=run, args=item) for item in streams.items()]
    wall = run_together(threads, barrier)
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    n = sum(len(v) for v in labels.values())
    return {"images": n, "seconds": wall, "img_s": n / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99)), "labels": labels}


def _fused_metrics(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for smp in fam.samples:
            if smp.name in ("tta_fused_step_streams_sum", "tta_fused_step_streams_count", "tta_fused_step_images_sum",
                            "tta_commit_group_streams_sum", "tta_commit_group_streams_count",
                            "tta_fused_queue_wait_seconds_sum", "tta_fused_queue_wait_seconds_count"):
                out[smp.name] = smp.value
    return out


def _config_flags(config: str) -> list[str]:
    """``off`` (--no-fused-steps) or ``on`` (the default scheduler), ``on`` optionally followed by ``/d<ms>``
    (max_batch_delay_ms), ``/c<n>`` (max_concurrent_streams), ``/g<n>`` (commit_group_max_streams; g1 = one
    durable write per stream, as before group commit), ``/i<ms>`` (gil_switch_interval_ms; i5 = Python's
    default) and ``/t<n>`` (torch_threads), e.g. ``on/d25/c1``."""
    head, *opts = config.split("/")
    if head == "off" and not opts:
        return ["--no-fused-steps"]
    if head != "on":
        raise ValueError(f"unknown config {config!r}")
    flags = ["--fused-steps"]
    for opt in opts:
        flag = {"d": "--max-batch-delay-ms", "c": "--max-concurrent-streams",
                "g": "--commit-group-max-streams", "i": "--gil-switch-interval-ms",
                "t": "--torch-threads"}.get(opt[:1])
        if flag is None:
            raise ValueError(f"unknown option {opt!r} in config {config!r}")
        flags += [flag, opt[1:]]
    return flags


def _mean_between(m0: dict[str, float], m1: dict[str, float], histogram: str) -> float | None:
    """The mean of ``histogram``'s observations between two :func:`_fused_metrics` readings (None: none)."""
    count = m1.get(histogram + "_count", 0.0) - m0.get(histogram + "_count", 0.0)
    return (m1.get(histogram + "_sum", 0.0) - m0.get(histogram + "_sum", 0.0)) / count if count else None


def _mixed_round(url: str, tag: str, small: dict, big: dict, alone: list) -> dict[str, Any]:
    """One round on one server: the big streams, the small streams, then stream 0 alone (fresh stream ids)."""
    before = _fused_metrics(url)
    b = _concurrent(url, {f"{tag}-big{k}": v for k, v in big.items()})
    mid = _fused_metrics(url)
    sm = _concurrent(url, {f"{tag}-small{k}": v for k, v in small.items()})
    after = _fused_metrics(url)
    a = _concurrent(url, {f"{tag}-alone0": alone})
    per_step = {}
    for name, (m0, m1) in (("big", (before, mid)), ("small", (mid, after))):
        per_step[name] = _mean_between(m0, m1, "tta_fused_step_streams")
        per_step[name + "_per_write"] = _mean_between(m0, m1, "tta_commit_group_streams")
    return {"big": b, "small": sm, "alone": a, "streams_per_fused_step": per_step,
            "stream0_small": sm["labels"][f"{tag}-small0"], "stream0_alone": a["labels"][f"{tag}-alone0"]}


def _start_servers(stack: contextlib.ExitStack, args: argparse.Namespace, configs: list[str],
                   warm: dict[str, list[tuple[bytes, str]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One `mgg serve` per config (own snapshot folder, stopped when ``stack`` closes), each warmed up with
    ``warm``; returns the servers by config and the last one's /info."""
    import httpx

    servers: dict[str, Any] = {}
    info: dict[str, Any] = {}
    for config in configs:
        snaps = stack.enter_context(tempfile.TemporaryDirectory())
        servers[config] = server = start_server(args, snaps, *_config_flags(config))
        stack.callback(server.stop, timeout=60)
        info = httpx.get(server.url + "/info", timeout=30).json()
        _concurrent(server.url, warm)
    return servers, info


def run_mixed(args: argparse.Namespace) -> int:
    """Many small streams vs few big ones on the default service, for each config (fused steps off / on)."""
    import json
    import platform


    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    small_data = {k: _stream_data(args, k, args.small_images, args.small_requests) for k in range(args.small_streams)}
    big_data = {k: _stream_data(args, 100 + k, args.big_images, args.big_requests) for k in range(args.big_streams)}
    small = {k: [npy_body(x) for x in xs] for k, (xs, _) in small_data.items()}
    big = {k: [npy_body(x) for x in xs] for k, (xs, _) in big_data.items()}
    truth0 = np.concatenate(small_data[0][1])
    print(f"mixed: {args.small_streams} streams x {args.small_requests} requests of {args.small_images} images vs "
          f"{args.big_streams} streams x {args.big_requests} of {args.big_images}; configs {configs}; "
          f"{args.rounds} rounds", flush=True)
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with contextlib.ExitStack() as stack:  # every config's server up at once; rounds alternate between them
        servers, info = _start_servers(stack, args, configs, {"warm-small": small[0][:2], "warm-big": big[0][:1]})
        for r in range(args.rounds):
            for config, server in servers.items():
                res = _mixed_round(server.url, f"{config.replace('/', '_')}-r{r}", small, big, small[0])
                res["accuracy_stream0_small"] = float(np.mean(np.array(res.pop("stream0_small")) == truth0))
                res["accuracy_stream0_alone"] = float(np.mean(np.array(res.pop("stream0_alone")) == truth0))
                for part in ("big", "small", "alone"):
                    res[part].pop("labels")
                results[config].append(res)
                _print_round(config, r, res)
        lone = {}
        for label, size, data in (("small", args.small_images, small[0]), ("big", args.big_images, big[0])):
            bodies = [data[i % len(data)] for i in range(args.lone_requests)]
            lone[label] = _lone_interleaved(servers, bodies, size, label)
            print(f"  lone stream, {size}-image requests, interleaved: " + ", ".join(
                f"{c} {v['img_s']:.1f} img/s (p50 {v['p50_ms']:.0f} ms)" for c, v in lone[label].items()), flush=True)
    summary = _mixed_summary(results)
    for config, row in summary.items():
        print(f"{config:>8}: small {row['small_img_s']:.1f} img/s, big {row['big_img_s']:.1f} img/s, ratio "
              f"{row['ratio']:.2f} (target >= 0.7), small p50/p99 {row['small_p50_ms']:.0f}/{row['small_p99_ms']:.0f} "
              f"ms, stream 0 accuracy {row['acc_small']:.3f} among 16 vs {row['acc_alone']:.3f} alone")
    if args.out:
        protocol = _mixed_protocol(args, info, configs)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"protocol": protocol, "summary": summary, "lone": lone, "rounds": results}
        (out / "mixed.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "mixed.md").write_text(_mixed_markdown(protocol, summary, lone))
        print(f"wrote {out / 'mixed.json'} and {out / 'mixed.md'} ({platform.node()})")
    return 0


def _lone_interleaved(servers: dict[str, Any], bodies: list[tuple[bytes, str]], n_images: int, tag: str
                      ) -> dict[str, dict[str, float]]:
    """One lone stream per config, request i sent to every config's server in a rotated order before request
    i + 1; each config's img/s is its images over the sum of its own request times (drifting load from other
    processes hits every config alike)."""
    import httpx

    names = list(servers)
    spent = dict.fromkeys(names, 0.0)
    lat: dict[str, list[float]] = {n: [] for n in names}
    clients = {n: httpx.Client(base_url=srv.url, timeout=600) for n, srv in servers.items()}
    try:
        for i, (body, ctype) in enumerate(bodies):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                sid = f"lone-{tag}-{name.replace('/', '_')}"
                r = clients[name].post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": sid})
                r.raise_for_status()
                dt = time.perf_counter() - t0
                spent[name] += dt
                lat[name].append(dt)
    finally:
        for c in clients.values():
            c.close()
    return {n: {"img_s": n_images * len(bodies) / spent[n], "p50_ms": 1000 * float(np.median(lat[n]))}
            for n in names}


def _print_round(config: str, r: int, res: dict[str, Any]) -> None:
    print(f"  {config:>10} round {r + 1}: small {res['small']['img_s']:7.1f} img/s "
          f"(p50 {res['small']['p50_ms']:.0f} ms, p99 {res['small']['p99_ms']:.0f} ms, "
          f"{res['streams_per_fused_step']['small'] or 1:.1f} streams/step, "
          f"{res['streams_per_fused_step'].get('small_per_write') or 1:.1f} streams/write) | big "
          f"{res['big']['img_s']:7.1f} img/s (p50 {res['big']['p50_ms']:.0f} ms) | ratio "
          f"{res['small']['img_s'] / res['big']['img_s']:.2f} | alone {res['alone']['img_s']:.1f} img/s | stream 0 "
          f"acc {res['accuracy_stream0_small']:.3f} among 16, {res['accuracy_stream0_alone']:.3f} alone", flush=True)


def _mixed_summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Medians over rounds; the ratio is the median of the per-round ratios (both measured back to back)."""
    out = {}
    for config, rounds in results.items():
        def med(f: Any, rounds: list[dict[str, Any]] = rounds) -> float:
            return float(np.median([f(r) for r in rounds]))

        out[config] = {
            "small_img_s": med(lambda r: r["small"]["img_s"]), "big_img_s": med(lambda r: r["big"]["img_s"]),
            "ratio": med(lambda r: r["small"]["img_s"] / r["big"]["img_s"]),
            "small_p50_ms": med(lambda r: r["small"]["p50_ms"]), "small_p99_ms": med(lambda r: r["small"]["p99_ms"]),
            "big_p50_ms": med(lambda r: r["big"]["p50_ms"]), "big_p99_ms": med(lambda r: r["big"]["p99_ms"]),
            "alone_img_s": med(lambda r: r["alone"]["img_s"]), "alone_p50_ms": med(lambda r: r["alone"]["p50_ms"]),
            "streams_per_step_small": med(lambda r: r["streams_per_fused_step"]["small"] or 1.0),
            "streams_per_write_small": med(lambda r: r["streams_per_fused_step"].get("small_per_write") or 1.0),
            "acc_small": med(lambda r: r["accuracy_stream0_small"]),
            "acc_alone": med(lambda r: r["accuracy_stream0_alone"]),
        }
    return out


def _mixed_protocol(args: argparse.Namespace, info: dict[str, Any], configs: list[str]) -> dict[str, Any]:
    import platform
    import subprocess

    import torch

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {
        "command": "scripts/bench_service.py " + " ".join(sys.argv[1:]),
        "server": "mgg serve (own process), default settings but --max-images/--max-body-bytes; configs: "
                  + ", ".join(f"{c} = {' '.join(_config_flags(c))}" for c in configs),
        "model": info.get("model"), "checkpoint": info.get("checkpoint"), "method": info.get("method"),
        "optimizer": info.get("optimizer"), "engine": info.get("engine"), "device": args.device,
        "preprocessing": "the classifier card's data config (service preprocessor), npy uint8 bodies",
        "data": "MNIST-5k test digits, clean (no corruption, severity n/a)",
        "order": "stream k: the test set shuffled with numpy default_rng(k).permutation (big streams k = 100, 101)",
        "batch": {"small": [args.small_streams, args.small_requests, args.small_images],
                  "big": [args.big_streams, args.big_requests, args.big_images],
                  "_": "[streams, requests per stream per round, images per request]"},
        "clients": "one thread per stream, requests one after the other, all streams start together",
        "reset_policy": "fresh stream ids per round and config (source state), no resets",
        "seed": "deterministic (stream state seed 0; no sampling)", "rounds": args.rounds,
        "schedule": "every config's server runs at once; each round runs big, small, alone on each config in turn",
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "commit": commit.strip()},
        "machine": f"{os.cpu_count()} CPU cores (shared with other work: compare ratios within one run)",
    }


def _mixed_markdown(protocol: dict[str, Any], summary: dict[str, dict[str, float]],
                    lone: dict[str, dict[str, dict[str, float]]]) -> str:
    rows = ["| config | small img/s | big img/s | ratio small/big | small p50 / p99 ms | big p50 / p99 ms | "
            "streams per fused step (small) | streams per durable write (small) | stream 0 acc. among 16 / alone |",
            "|" + " --- |" * 9]
    for c, r in summary.items():
        rows.append(f"| {c} | {r['small_img_s']:.1f} | {r['big_img_s']:.1f} | {r['ratio']:.2f} | "
                    f"{r['small_p50_ms']:.0f} / {r['small_p99_ms']:.0f} | {r['big_p50_ms']:.0f} / "
                    f"{r['big_p99_ms']:.0f} | {r['streams_per_step_small']:.1f} | {r['streams_per_write_small']:.1f} | "
                    f"{r['acc_small']:.3f} / "
                    f"{r['acc_alone']:.3f} |")
    rows += ["", "Lone stream (requests interleaved one by one between the configs' servers):", "",
             "| request size | " + " | ".join(f"{c} img/s (p50 ms)" for c in summary) + " |",
             "|" + " --- |" * (len(summary) + 1)]
    for label, per in lone.items():
        rows.append(f"| {label} | " + " | ".join(f"{v['img_s']:.1f} ({v['p50_ms']:.0f})" for v in per.values()) + " |")
    return ("# Many small streams vs few big ones (issue 10)\n\n" + "\n".join(rows) + "\n\nMedians over rounds; the "
            "ratio is the median of per-round ratios. Target: small/big >= 0.7.\n\n```\n" + protocol["command"]
            + "\n```\n\nProtocol: see mixed.json (`protocol`).\n")


def run_think(args: argparse.Namespace) -> int:
    """The latency cost of waiting for other streams when clients are not in lock-step: ``--small-streams`` streams
    of ``--small-images``-image requests, each waiting uniform(0.5, 1.5) x ``--think-ms`` after every answer, on each
    config's server (rounds alternate between them): request p50/p99, mean queue wait, streams per fused step."""
    import json


    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    small = {k: [npy_body(x) for x in _stream_data(args, k, args.small_images, args.small_requests)[0]]
             for k in range(args.small_streams)}
    print(f"think: {args.small_streams} streams x {args.small_requests} requests of {args.small_images} images, "
          f"think {args.think_ms} ms x uniform(0.5, 1.5); configs {configs}; {args.rounds} rounds", flush=True)
    rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    with contextlib.ExitStack() as stack:
        servers, info = _start_servers(stack, args, configs, {"warm-small": small[0][:2]})
        for r in range(args.rounds):
            for config, server in servers.items():
                m0 = _fused_metrics(server.url)
                res = _concurrent(server.url, {f"{config.replace('/', '_')}-r{r}-s{k}": v for k, v in small.items()},
                                  think_s=args.think_ms / 1000)
                m1 = _fused_metrics(server.url)
                wait = _mean_between(m0, m1, "tta_fused_queue_wait_seconds")
                row = {"img_s": res["img_s"], "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                       "streams_per_step": _mean_between(m0, m1, "tta_fused_step_streams"),
                       "queue_wait_ms": None if wait is None else 1000 * wait}
                rounds[config].append(row)
                print(f"  {config:>8} round {r + 1}: p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                      f"queue wait {row['queue_wait_ms'] or 0:.1f} ms, "
                      f"{row['streams_per_step'] or 0:.1f} streams/step, {row['img_s']:.1f} img/s", flush=True)
    summary = {c: {k: float(np.median(v)) if (v := [row[k] for row in rows if row[k] is not None]) else float("nan")
                   for k in rows[0]} for c, rows in rounds.items()}
    for c, row in summary.items():
        print(f"{c:>8}: p50/p99 {row['p50_ms']:.0f}/{row['p99_ms']:.0f} ms, queue wait {row['queue_wait_ms']:.1f} ms, "
              f"{row['streams_per_step']:.1f} streams/step, {row['img_s']:.1f} img/s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        protocol = {**_mixed_protocol(args, info, configs), "think_ms": args.think_ms,
                    "clients": "one thread per stream; after each answer it waits uniform(0.5, 1.5) x think_ms"}
        (out / "think.json").write_text(json.dumps({"protocol": protocol, "summary": summary, "rounds": rounds},
                                                      indent=1) + "\n")
        rows = ["| config | p50 / p99 ms | mean queue wait ms | streams per fused step | img/s |", "|" + " --- |" * 5]
        rows += [f"| {c} | {r['p50_ms']:.0f} / {r['p99_ms']:.0f} | {r['queue_wait_ms']:.1f} | "
                 f"{r['streams_per_step']:.1f} | {r['img_s']:.1f} |" for c, r in summary.items()]
        (out / "think.md").write_text(
            "# Clients that think between requests: the latency cost of fused steps (issue 10)\n\n"
            f"{args.small_streams} streams of "
            f"{args.small_images}-image requests, each waiting uniform(0.5, 1.5) x {args.think_ms} ms after every "
            "answer. Medians over rounds.\n\n" + "\n".join(rows) + f"\n\n```\n{protocol['command']}\n```\n")
        print(f"wrote {out / 'think.json'} and {out / 'think.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p, batches=40, batches_help="timed batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; medians are reported")
    p.add_argument("--mode", choices=["inprocess", "mixed", "think"], default="inprocess",
                   help="inprocess: one stream over HTTP vs the in-process loop (above); mixed: many small streams "
                   "vs few big ones, fused steps off vs on (run_mixed below); think: the latency cost of fused "
                   "steps for clients that pause between an answer and their next request (run_think)")
    add_mixed_args(p)
    p.add_argument("--think-ms", type=float, default=300.0, help="think: mean pause after each answer")
    args = p.parse_args(argv)
    if args.mode in ("mixed", "think"):
        return {"mixed": run_mixed, "think": run_think}[args.mode](args)

    from service.settings import ServiceSettings

    overrides = {k: getattr(args, k) for k in ("method", "optimizer", "lr", "mgg_checkpoint")
                 if getattr(args, k) is not None}
    settings = ServiceSettings(_env_file=None, model=args.model, device=args.device, **overrides)
    total = args.warmup + args.batches
    data = digits(total * args.batch_size)
    batches = [data[i * args.batch_size:(i + 1) * args.batch_size] for i in range(total)]
    print(f"model={settings.model} method={settings.method} optimizer={settings.optimizer} lr={settings.lr} "
          f"device={args.device} batch={args.batch_size} timed_batches={args.batches} (MNIST-5k digits, 28x28)")

    import httpx

    warm, timed = batches[:args.warmup], batches[args.warmup:]
    local = InProcess(settings, warm)
    encoded = {name: [enc(b) for b in batches] for name, enc in (("npy", npy_body), ("multipart PNG", png_multipart))}
    sizes = [len(b) for b in timed]
    rows: dict[str, list[float]] = {"in-process": [], "npy": [], "multipart PNG": []}
    with tempfile.TemporaryDirectory() as snaps:
        server = start_server(args, snaps)
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for name, bodies in encoded.items():  # warm the server's paths
                    over_http(client, bodies[:args.warmup], [len(b) for b in warm], f"warm-{name[:3]}")
                # rounds alternate the three loops so that load from other processes hits them alike
                for r in range(args.rounds):
                    res = local.run(timed)
                    rows["in-process"].append(res["img_s"])
                    line = (f"round {r + 1}: in-process {res['img_s']:8.1f} img/s "
                            f"(step alone {res['step_only_img_s']:.1f})")
                    for name, bodies in encoded.items():
                        h = over_http(client, bodies[args.warmup:], sizes, f"bench-{name[:3]}-{r}")
                        assert h["adapted_batches"] == len(timed), h
                        rows[name].append(h["img_s"])
                        line += f" | {name} {h['img_s']:8.1f} img/s"
                    print(line, flush=True)
        finally:
            server.stop(timeout=60)
    base = float(np.median(rows["in-process"]))
    kib = {name: sum(len(b) for b, _ in bodies[args.warmup:]) / len(timed) / 1024 for name, bodies in encoded.items()}
    print(f"median over {args.rounds} rounds ({len(timed)} batches of {args.batch_size} each); the ratio is the "
          f"median of the per-round ratios (each round measures both back to back):")
    print(f"  in-process adapt loop (preprocess + step) {base:9.1f} img/s")
    for name in ("npy", "multipart PNG"):
        m = float(np.median(rows[name]))
        ratio = float(np.median([h / i for h, i in zip(rows[name], rows["in-process"], strict=False)]))
        print(f"  HTTP /predict, {name:<14}            {m:9.1f} img/s   ratio {ratio:.2f}"
              f"   ({kib[name]:.0f} KiB/request)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
