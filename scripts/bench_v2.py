#!/usr/bin/env python
"""Throughput of the Open Inference Protocol endpoint (POST /v2/models/<m>/infer, binary tensors) vs POST /predict
with npy bodies, on one `mgg serve` process, in the same run.

Both paths end in the same ``DataPlane.step`` (preprocess + ``engine.step`` on the stream); what differs is the
protocol layer: npy parsing vs V2 JSON header + binary tensor (wrapped as npy and checked by the same
``decode_npy``), and a JSON ``/predict`` answer (per-image top-k dicts) vs binary output tensors. Requests are
sequential on one fresh stream per round and protocol (a stream's batches are applied one at a time anyway),
bodies encoded before timing; within a round the protocols' requests are interleaved one by one (batch i of each
protocol, in an order rotated with i), and each protocol's rate is its images over the sum of its own request
times, so that load from other processes (a shared CPU) hits them alike.
Rows: /predict npy (the reference), V2 binary (httpx), V2 binary through tritonclient (when installed), V2 JSON
tensors (httpx). Prints images/s and each row's ratio to /predict npy (median of per-round ratios).

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/bench_v2.py --batch-size 64 --batches 30 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from benchkit import add_server_args, digits, start_server  # noqa: E402  (scripts/benchkit.py: data and server set-up)

from mgg_replay.client import encode_npy  # noqa: E402
from mgg_replay.v2 import encode_infer, infer_path  # noqa: E402


def v2_json(batch: np.ndarray, seq: str) -> tuple[bytes, dict[str, str]]:
    doc = {"parameters": {"sequence_id": seq}, "inputs": [{"name": "images", "datatype": "UINT8",
                                                           "shape": list(batch.shape), "data": batch.ravel().tolist()}]}
    return json.dumps(doc, separators=(",", ":")).encode(), {"Content-Type": "application/json"}


def timed(send: Callable[[int], bool], n_requests: int, n_images: int) -> float:
    """Images/s of ``n_requests`` sequential calls of ``send(i)`` (each returns whether the batch adapted)."""
    t0 = time.perf_counter()
    adapted = sum(bool(send(i)) for i in range(n_requests))
    dt = time.perf_counter() - t0
    assert adapted == n_requests, f"{adapted}/{n_requests} batches adapted"
    return n_images / dt


def interleaved(rows: dict[str, Callable[[int], bool]], n_requests: int, n_images: int) -> dict[str, float]:
    """Images/s per row, the rows' requests interleaved: batch i of every row (in an order rotated with i), then
    batch i + 1 ...; each row's time is the sum of its own requests' times, so load from other processes that
    drifts over seconds hits every row alike."""
    names = list(rows)
    spent = dict.fromkeys(names, 0.0)
    for i in range(n_requests):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            assert rows[name](i), f"{name}: batch {i} did not adapt"
            spent[name] += time.perf_counter() - t0
    return {name: n_images / spent[name] for name in names}


def senders(client: Any, triton: Any, model: str, batches: list[np.ndarray], stream: str
            ) -> dict[str, Callable[[int], bool]]:
    """One sender per protocol row; bodies are encoded here, before timing."""
    npy = [encode_npy(b) for b in batches]
    v2b = [encode_infer(b, stream + "-v2b") for b in batches]
    v2j = [v2_json(b, stream + "-v2j") for b in batches]
    path = infer_path(model)

    def predict(i: int) -> bool:
        r = client.post("/predict", content=npy[i][0], headers={**npy[i][1], "X-Stream-Id": stream + "-npy"})
        r.raise_for_status()
        return bool(r.json()["adapted"])

    def v2(bodies: list[tuple[bytes, dict[str, str]]]) -> Callable[[int], bool]:
        def send(i: int) -> bool:
            r = client.post(path, content=bodies[i][0], headers=bodies[i][1])
            r.raise_for_status()
            n = int(r.headers.get("Inference-Header-Content-Length", len(r.content)))
            return bool(json.loads(r.content[:n])["parameters"]["adapted"])
        return send

    rows = {"/predict npy": predict, "V2 binary": v2(v2b)}
    if triton is not None:
        import tritonclient.http as tc

        def via_tritonclient(i: int) -> bool:
            inp = tc.InferInput("images", list(batches[i].shape), "UINT8")
            inp.set_data_from_numpy(batches[i])
            res = triton.infer(model, [inp], sequence_id=stream + "-trc")
            return bool(res.get_response()["parameters"]["adapted"])

        rows["V2 binary (tritonclient)"] = via_tritonclient
    rows["V2 JSON tensors"] = v2(v2j)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_server_args(p, batches=30, batches_help="timed batches per round and protocol")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)

    import httpx

    total = args.warmup + args.batches
    data = digits(total * args.batch_size)
    batches = [data[i * args.batch_size:(i + 1) * args.batch_size] for i in range(total)]
    warm, work = batches[:args.warmup], batches[args.warmup:]
    n_images = sum(len(b) for b in work)
    print(f"model={args.model} method={args.method or 'default'} device={args.device} batch={args.batch_size} "
          f"timed_batches={args.batches} rounds={args.rounds} (MNIST-5k digits, 28x28, uint8)", flush=True)
    try:
        import tritonclient.http as tc
    except ImportError:
        tc = None
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as snaps:
        server = start_server(args, snaps)
        triton = tc.InferenceServerClient(server.url.removeprefix("http://"), network_timeout=600) if tc else None
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                model = str(client.post("/v2/repository/index").json()[0]["name"])
                for send in senders(client, triton, model, warm, "warm").values():
                    timed(send, len(warm), sum(len(b) for b in warm))
                for r in range(args.rounds):
                    line = f"round {r + 1}:"
                    for name, rate in interleaved(senders(client, triton, model, work, f"bench-{r}"),
                                                  len(work), n_images).items():
                        rates.setdefault(name, []).append(rate)
                        line += f" | {name} {rate:7.1f} img/s"
                    print(line, flush=True)
        finally:
            if triton is not None:
                triton.close()
            server.stop(timeout=60)
    ref = rates["/predict npy"]
    print(f"median over {args.rounds} rounds; ratio = median of per-round (row / '/predict npy'):")
    for name in sorted(rates, key=list(rates).index):
        vals = rates[name]
        ratios = [v / b for v, b in zip(vals, ref, strict=True)]
        print(f"  {name:<26} {float(np.median(vals)):8.1f} img/s   ratio {float(np.median(ratios)):.2f}"
              f"   (per round {min(ratios):.2f}..{max(ratios):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
