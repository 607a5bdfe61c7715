"""What the service benchmarks share (bench_service.py, bench_v2.py): the MNIST-5k digits they send and the
`mgg serve` process they measure (started in its own process, as deployed, with the benchmark's flags).

Scripts import it as a sibling module (``scripts/`` is on ``sys.path`` when a script in it runs).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

__all__ = ["REPO", "digits", "labelled_digits", "run_together", "start_server"]


def digits(n: int) -> np.ndarray:
    """``n`` MNIST-5k test digits (uint8, N x 28 x 28) in test-set order (sorted by class), cycling."""
    from mgg_core.data.sources import mnist5k

    src = mnist5k("test")
    idx = np.arange(n) % len(src)
    return np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8)


def labelled_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` MNIST-5k test digits in a shuffled order (``numpy.random.default_rng(seed).permutation``, cycling;
    the test set itself is sorted by class) and their labels."""
    from mgg_core.data.sources import mnist5k

    src = mnist5k("test")
    order = np.random.default_rng(seed).permutation(len(src))
    idx = order[np.arange(n) % len(src)]
    return np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8), np.asarray(src.labels)[idx]


def add_server_args(p: Any, *, batches: int, batches_help: str) -> None:
    """The flags :func:`start_server` reads (model, engine, device, batch size), plus ``--batches``."""
    p.add_argument("--model", default="resnet", help="'vit', 'resnet' or a classifier checkpoint")
    p.add_argument("--method", default=None, help="default: the service default")
    p.add_argument("--optimizer", default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--mgg-checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=batches, help=batches_help)


def start_server(args: Any, snapshot_dir: str, *extra: str, env: dict[str, str] | None = None) -> Any:
    """`mgg serve` in its own process with the benchmark's settings; returned started and ready.

    Args:
        args: the benchmark's parsed arguments: ``model``, ``device``, ``batch_size`` and, when set, ``method``,
            ``optimizer``, ``lr``, ``mgg_checkpoint``.
        snapshot_dir: the server's snapshot folder.
        extra: more ``mgg serve`` flags.
        env: more environment variables (``MGG_*`` settings); the caller's ``MGG_*`` variables are not passed on.
    """
    from mgg_replay.server import ServerProcess, serve_command

    flags = ["--snapshot-dir", snapshot_dir, "--model", args.model, "--device", args.device, "--log-level", "warning",
             "--max-images", str(max(64, args.batch_size)), "--max-body-bytes", str(256 * 1024 * 1024), *extra]
    for flag in ("method", "optimizer", "lr", "mgg_checkpoint"):
        v = getattr(args, flag, None)
        if v is not None:
            flags += [f"--{flag.replace('_', '-')}", str(v)]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("MGG_")}
    run_env.update({"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env or {})})
    return ServerProcess(lambda port: serve_command(port, *flags), run_env, ready_timeout=300, capture=True,
                         inherit_env=False).start()


def run_together(threads: list[Any], barrier: Any) -> float:
    """Start ``threads``, which wait on ``barrier`` (``len(threads) + 1`` parties) before their work, release them
    together and join them; returns the wall seconds from the release to the last one's end."""
    import time

    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0
