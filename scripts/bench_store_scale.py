#!/usr/bin/env python
"""The stream store's per-request bookkeeping as the number of known streams grows (issue 10: many streams).

A real :class:`service.store.StreamStore` over the default engine (bundled ResNet, ``durability="interval"`` so
that creating the streams writes nothing), in one event loop: ``--streams`` N streams are created through the
public path (``reserve`` + ``run``), then 16 of them take ``--requests`` jobs in turn whose step function does
nothing but count. The time per job is the store's own per-request work (queue ticket, job task, worker-thread
hop, LRU, accounting, gauges), the part that must not grow with N. Prints microseconds per job for each N and the
ratio to the smallest N.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_store_scale.py --streams 16 1000 10000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


async def per_job_us(engine, n_streams: int, requests: int) -> float:
    """Microseconds per no-op job on 16 streams of a store holding ``n_streams`` resident streams."""
    from service.metrics import ServiceMetrics
    from service.store import StreamStore

    with tempfile.TemporaryDirectory() as snaps:
        store = StreamStore(engine, snaps, metrics=ServiceMetrics(), budget_bytes=2**40, durability="interval",
                            snapshot_interval_steps=10**9, snapshot_interval_seconds=10**6, max_streams=n_streams,
                            max_queue_total=10**6)
        await store.start()
        try:
            for i in range(n_streams):
                await store.run(store.reserve(f"s{i}"), lambda state: None)
            hot = [f"s{i}" for i in range(min(16, n_streams))]
            t0 = time.perf_counter()
            for j in range(requests):
                await store.run(store.reserve(hot[j % len(hot)]), lambda state: None)
            return 1e6 * (time.perf_counter() - t0) / requests
        finally:
            await store.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, nargs="+", default=[16, 1000, 10000], help="known streams per run")
    ap.add_argument("--requests", type=int, default=2000, help="timed jobs per run")
    args = ap.parse_args(argv)
    from service.runtime import load_runtime
    from service.settings import ServiceSettings

    engine = load_runtime(ServiceSettings(_env_file=None)).engine
    base = None
    for n in args.streams:
        us = asyncio.run(per_job_us(engine, n, args.requests))
        base = base or us
        print(f"{n:6d} known streams: {us:7.1f} us per job ({us / base:.2f}x the first)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
