"""Batch-size sweep of the service's default engine, in process (no HTTP), on the replay stream.

Reproduces what ``mgg replay --streams 1 --images-per-domain 64 --batch-size B`` measures against the default
service (service/settings.py defaults, guard on), for both bundled models, but without a server: the same
StreamSpec (the replay's default domains, 64 images per domain, one stream, seed 0, continual), the same images,
re-chunked into requests of B images. Engine knobs can be overridden to compare designs::

    nice -n 10 .venv/bin/python scripts/smallbatch_sweep.py --models resnet vit --batch-sizes 64 16 4 1
    nice -n 10 .venv/bin/python scripts/smallbatch_sweep.py --set norm_stats=batch --set update_images=0

Prints one row per (model, variant): no adaptation, then accuracy at each batch size, plus seconds per image
relative to batch 64 (timings are noisy on a shared CPU: read them as ratios within one run).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch


def replay_stream(images_per_domain: int = 64, seed: int = 0, label_shift: float | None = None,
                  corruptions: list[str] | None = None, domain_order: str = "shuffled"):
    """(domain name, uint8 images, labels) per domain of ``mgg replay``'s first stream."""
    from mgg_core.data.streams import iter_batches, open_stream_source
    from mgg_replay.plans import SpecOptions, stream_specs

    opts = SpecOptions(images_per_domain=images_per_domain, streams=1, batch_size=64, seed=seed,
                       label_shift=label_shift, corruptions=corruptions, domain_order=domain_order)
    spec = stream_specs(opts)[0]
    source = open_stream_source(spec)
    out: dict[str, list] = {}
    for b in iter_batches(spec, source):
        out.setdefault(b.domains[0], []).append((np.asarray(b.images), np.asarray(b.labels)))
    return spec, [(d, np.concatenate([i for i, _ in v]), np.concatenate([y for _, y in v])) for d, v in out.items()]


def load_default_runtime(model: str):
    from service.app import load_runtime
    from service.settings import ServiceSettings

    return load_runtime(ServiceSettings(model=model, device="cpu"))


#: bench method name -> (engine method, optimizer); "default" = the service's default engine (ServiceSettings defaults)
METHOD_PARTS = {"default": (None, None), "bn": ("bn", None), "tent": ("tent", "sgd"), "eata": ("eata", "sgd"),
                "sar": ("sar", "sgd"), "deyo": ("deyo", "sgd"), "foa": ("foa", "sgd"), "mgg": ("foa", "mgg")}


def engine_variant(rt, method: str | None = None, optimizer: str | None = None, **overrides):
    """The service's engine with ``overrides``; ``method`` swaps the method (its default optimizer unless given;
    BatchNorm statistics as configured, except for methods that keep the source's)."""
    from mgg_core.engine import AdaptationEngine
    from mgg_core.methods import build_method

    cfg = dataclasses.replace(rt.engine.config, **overrides)
    if method is not None:
        keeps_source = build_method(method, rt.engine.num_classes).bn_stats == "source"
        cfg = dataclasses.replace(cfg, method=method, optimizer=optimizer,
                                  mgg_checkpoint=cfg.mgg_checkpoint if optimizer == "mgg" else None,
                                  bn_stats=None if keeps_source else cfg.bn_stats)
    return AdaptationEngine(rt.classifier, cfg, source_stats=rt.engine.source_stats)


def run(engine, domains, batch_size: int, seed: int = 0) -> dict:
    state = engine.new_state(seed=seed)
    per_domain, t0, fallbacks, releases = {}, time.perf_counter(), 0, 0
    for name, x, y in domains:
        correct = 0
        for i in range(0, len(y), batch_size):
            res = engine.step(state, x[i:i + batch_size])
            correct += int((res.logits.argmax(1) == y[i:i + batch_size]).sum())
            fallbacks += int(res.rolled_back)
            releases += int(res.hold_released is not None)
        per_domain[name] = 100.0 * correct / len(y)
    n = sum(len(y) for _, _, y in domains)
    acc = 100.0 * sum(per_domain[d] * len(y) / 100.0 for d, _, y in domains) / n
    return {"accuracy": acc, "per_domain": per_domain, "seconds": time.perf_counter() - t0, "images": n,
            "rollbacks": fallbacks, "rollbacks_total": state.rollbacks, "hold_releases": releases}


def _parse_set(items):
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet", "vit"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 16, 4, 1])
    p.add_argument("--methods", nargs="+", default=["default"], choices=sorted(METHOD_PARTS),
                   help="'default' = the service's default engine; others swap the method (bench names)")
    p.add_argument("--images-per-domain", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", help="EngineConfig override KEY=JSON (repeatable)")
    p.add_argument("--guard", default=None, help="GuardConfig overrides as JSON")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--out", default=None, help="folder for results.json (protocol + numbers) and README.md")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    spec, raw = replay_stream(args.images_per_domain, args.seed)
    overrides = _parse_set(args.set)
    results = {"spec": spec.to_dict(), "overrides": overrides, "models": {}}
    for model in args.models:
        rt = load_default_runtime(model)
        doms = [(d, rt.preprocessor(imgs), torch.as_tensor(y)) for d, imgs, y in raw]
        if args.guard:
            overrides["guard"] = dataclasses.replace(rt.engine.config.guard, **json.loads(args.guard))
        noadapt = run(engine_variant(rt, method="noadapt"), doms, 64)
        results["models"][model] = {}
        for name in args.methods:
            method, optimizer = METHOD_PARTS[name]
            eng = engine_variant(rt, method, optimizer, **overrides)
            row = {"noadapt": noadapt, "engine": eng.describe()}
            for b in args.batch_sizes:
                row[b] = run(eng, doms, b, args.seed)
            results["models"][model][name] = row
            base = row[args.batch_sizes[0]]["seconds"] / row[args.batch_sizes[0]]["images"]
            cells = " ".join(f"b{b}={row[b]['accuracy']:.1f}(x{row[b]['seconds'] / row[b]['images'] / base:.1f},"
                             f"rb{row[b]['rollbacks']})" for b in args.batch_sizes)
            knobs = json.dumps({k: str(v) for k, v in overrides.items()})
            print(f"{model:6s} {name:7s} {knobs} noadapt={noadapt['accuracy']:.1f} {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        write_results(Path(args.out), results, args, argv)
    return 0


def write_results(out: Path, results: dict, args, argv) -> None:
    """``results.json`` (protocol + numbers) and ``README.md`` (the table) under ``out``."""
    import platform

    from mgg_core.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    cmd = "nice -n 10 .venv/bin/python scripts/smallbatch_sweep.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:])
    results["protocol"] = {
        "command": cmd, "stream_spec": results["spec"], "images_per_domain": args.images_per_domain,
        "streams": 1, "seed": args.seed, "reset": "never (continual, as mgg replay)",
        "order": "replay's default domains in the stream's shuffled order; the same images for every batch size",
        "service": "default ServiceSettings built by service.runtime.load_runtime, cpu (method, optimizer, lr, "
                   "bn_stats, window, guard: models.<model>.<method>.engine)",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "threads": args.threads,
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    sizes = args.batch_sizes
    lines = ["# Batch-size sweep of the default service engine (in process)", "",
             f"Command: `{cmd}`", "",
             "Stream: `mgg replay`'s default domains (" + ", ".join(results["spec"]["domains"] and
                                                                 [f"{d[0]}-{d[1]}" for d in results["spec"]["domains"]])
             + f"), {args.images_per_domain} images per domain, one stream, seed {args.seed}, never reset. "
             "Accuracy (%) of the predictions made before each update; cost = seconds per image relative to "
             f"batch {sizes[0]} (same run, shared CPU: read as ratios).", "",
             "| model / method | no adaptation | " + " | ".join(f"batch {b}" for b in sizes) + " | "
             + " | ".join(f"cost b{b}" for b in sizes[1:]) + " | guard fallbacks |",
             "| --- | ---: | " + " | ".join("---:" for _ in sizes) + " | " + " | ".join("---:" for _ in sizes[1:])
             + " | ---: |"]
    for model, rows in results["models"].items():
        for name, row in rows.items():
            lines.append(_row(f"{model} / {name}", row, sizes))
    atomic_write_text(out / "README.md", "\n".join(lines) + "\n")


def _row(label: str, row: dict, sizes) -> str:
    base = row[sizes[0]]["seconds"] / row[sizes[0]]["images"]
    cost = [row[b]["seconds"] / row[b]["images"] / base for b in sizes[1:]]
    return (f"| {label} | {row['noadapt']['accuracy']:.1f} | "
            + " | ".join(f"{row[b]['accuracy']:.1f}" for b in sizes) + " | "
            + " | ".join(f"{c:.1f}x" for c in cost) + " | "
            + ", ".join(f"b{b}: {row[b]['rollbacks']}" for b in sizes) + " |")

if __name__ == "__main__":
    sys.exit(main())
