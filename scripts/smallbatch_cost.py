"""In-process cost per image of the service's default engine at small request sizes, relative to batch 64.

The default engine (``service.runtime.load_runtime`` with default ``ServiceSettings``: method, optimizer, per-stream
BatchNorm statistics, the gradient window, the guard with its source checks) classifies the same ``--images``
images of the replay stream cut into requests of each size, on one fresh stream per size, after one untimed
warm-up pass. Prints seconds per image and the ratio to the first batch size (default 64), per model::

    nice -n 10 .venv/bin/python scripts/smallbatch_cost.py --models resnet vit --batch-sizes 64 16 4 1

Timings on a shared CPU are noisy: read the ratios, which come from one run (``--repeats`` takes the best of N).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smallbatch_sweep import load_default_runtime, replay_stream


def seconds_per_image(engine, x: torch.Tensor, batch_size: int) -> float:
    state = engine.new_state(seed=0)
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        engine.step(state, x[i:i + batch_size])
    return (time.perf_counter() - t0) / x.shape[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet", "vit"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 16, 4, 1])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    _, doms = replay_stream(64, 0)
    for model in args.models:
        rt = load_default_runtime(model)
        x = torch.cat([rt.preprocessor(imgs) for _, imgs, _ in doms])[: args.images]
        seconds_per_image(rt.engine, x[:64], 16)     # warm-up (allocator, lazy init)
        cost = {b: min(seconds_per_image(rt.engine, x, b) for _ in range(args.repeats)) for b in args.batch_sizes}
        base = cost[args.batch_sizes[0]]
        cells = "  ".join(f"b{b}: {1e3 * c:.2f} ms/img ({c / base:.1f}x)" for b, c in cost.items())
        print(f"{model:6s} {rt.engine.method.name}+{rt.engine.optimizer.name if rt.engine.optimizer else '-'} "
              f"images={x.shape[0]} threads={args.threads}  {cells}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
