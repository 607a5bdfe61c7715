"""``mgg bench --batch-sizes 1,4,16,64``: the benchmark once per batch size over the same images.

Contract: every size runs the same :class:`~mgg_core.bench.runner.BenchConfig` (same methods, step sizes, engine
knobs, stream spec and seed; only ``spec.batch_size`` differs), so the sampled images and their order are the
same and only the request size changes. Each run writes its own report under ``OUT/batch_<B>/`` (and resumes
from its cache); ``OUT/batch_size_sweep.json`` (protocol + accuracy per method and size) and
``OUT/batch_size_sweep.md`` (the table) sum them up.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from ..data.streams import default_stream_spec
from ..io import atomic_write_text

__all__ = ["run_batch_size_sweep", "sweep_table"]


def run_batch_size_sweep(cfg, run_bench: Callable[..., dict]) -> dict:
    """Run ``run_bench`` for each of ``cfg.batch_sizes``; returns (and writes) the combined record.

    Args:
        cfg: the bench config; ``cfg.batch_sizes`` lists the sizes, everything else is shared.
        run_bench: the single-size runner (``mgg_core.bench.runner.run_bench``).
    """
    spec = cfg.spec if cfg.spec is not None else default_stream_spec()
    out = Path(cfg.out)
    runs = {}
    for b in cfg.batch_sizes:
        one = dataclasses.replace(cfg, out=out / f"batch_{b}", batch_sizes=None,
                                  spec=dataclasses.replace(spec, batch_size=int(b)))
        runs[int(b)] = run_bench(one)
    record = {
        "protocol": {"base": {k: v for k, v in cfg.to_dict().items() if k != "spec"},
                     "stream": spec.to_dict() | {"batch_size": "swept"},
                     "batch_sizes": [int(b) for b in cfg.batch_sizes],
                     "note": "same methods, step sizes, engine knobs, images and order at every batch size"},
        "accuracy": {b: {m: s["mean_accuracy"] for m, s in r["summary"].items() if not m.startswith("_")}
                     for b, r in runs.items()},
        "runs": {b: str(out / f"batch_{b}" / "results.json") for b in runs},
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "batch_size_sweep.json", json.dumps(record, indent=1, default=str))
    atomic_write_text(out / "batch_size_sweep.md", sweep_table(record))
    return record


def sweep_table(record: dict) -> str:
    sizes = sorted(record["accuracy"], key=int, reverse=True)
    methods = list(record["accuracy"][sizes[0]])
    lines = ["# Batch-size sweep", "", "Mean accuracy (%) over the stream's domains; the same images at every size.",
             "", "| method | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "| --- | " + " | ".join("---:" for _ in sizes) + " |"]
    for m in methods:
        cells = [f"{record['accuracy'][b].get(m, float('nan')):.1f}" for b in sizes]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
