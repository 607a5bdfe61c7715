"""In-process cost per image of the service's default engine at small request sizes, relative to batch 64.

The default engine (``service.runtime.load_runtime`` with default ``ServiceSettings``: method, optimizer, per-stream
BatchNorm statistics, the gradient window, the guard with its source checks) classifies the same ``--images``
images of the replay stream cut into requests of each size, on one fresh stream per size, after one untimed
warm-up pass. Prints seconds per image and the ratio to the first batch size (default 64), per model::

    nice -n 10 .venv/bin/python scripts/smallbatch_cost.py --models resnet vit --batch-sizes 64 16 4 1

Timings on a shared CPU are noisy: read the ratios, which come from one run (``--repeats`` takes the best of N).
``--set KEY=JSON`` (repeatable) also times the default engine with these ``EngineConfig`` overrides, alternating with
the default per repeat, and prints its cost relative to the default's at each size (a feature's cost per image)::

    nice -n 15 .venv/bin/python scripts/smallbatch_cost.py --models resnet --set bn_balanced=0.5

``--against KEY=JSON`` (repeatable) makes the reference of that comparison the default engine with these overrides,
and the variant the reference plus ``--set``'s (the cost of one feature on top of others, e.g. the agreement gate on
the gated correction)::

    nice -n 15 .venv/bin/python scripts/smallbatch_cost.py --models resnet --against bn_balanced=1.0 \
        --against 'bn_balanced_form="correction"' --set bn_balanced_agree=true
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smallbatch_sweep import engine_variant, load_default_runtime, replay_stream


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
    p.add_argument("--set", action="append", default=[], help="EngineConfig override KEY=JSON (repeatable): also "
                   "time this variant of the default engine and print its cost relative to the default's")
    p.add_argument("--against", action="append", default=[], help="EngineConfig override KEY=JSON (repeatable): "
                   "the reference of --set's comparison is the default engine with these (the variant: both)")
    args = p.parse_args(argv)
    against = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.against)}
    overrides = {k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)}
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
        if overrides:
            ref = engine_variant(rt, **against) if against else rt.engine
            if against:
                seconds_per_image(ref, x[:64], 16)     # the reference's warm-up
            _compare(ref, engine_variant(rt, **{**against, **overrides}), x, args, overrides, against)
    return 0


def _compare(default, variant, x: torch.Tensor, args, overrides: dict, against: dict | None = None) -> None:
    """Per size, the best of ``--repeats`` alternating runs of both engines; the variant's cost / the reference's
    (the default engine, or with ``against``'s overrides)."""
    seconds_per_image(variant, x[:64], 16)     # its warm-up
    best: dict[str, dict[int, float]] = {"default": {}, "variant": {}}
    for b in args.batch_sizes:
        for _ in range(args.repeats):
            for name, eng in (("default", default), ("variant", variant)):
                c = seconds_per_image(eng, x, b)
                best[name][b] = min(best[name].get(b, c), c)
    cells = "  ".join(f"b{b}: {1e3 * best['variant'][b]:.2f} vs {1e3 * best['default'][b]:.2f} ms/img "
                      f"({best['variant'][b] / best['default'][b]:.2f}x)" for b in args.batch_sizes)
    ref = f"default + {json.dumps(against)}" if against else "default"
    print(f"       variant {json.dumps(overrides)} vs {ref}:  {cells}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
