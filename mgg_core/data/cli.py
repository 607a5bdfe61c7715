"""`mgg data ...`: data tools. `mgg data make-c` writes a corrupted copy of a labelled source as PNGs in the
ImageNet-C layout OUT/<corruption>/<severity>/<class>/<index>.png plus OUT/manifest.json.

    mgg data make-c --data mnist5k --out data/mnist5k-c                      # 15 corruptions x 5 severities
    mgg data make-c --data mnist5k --out data/mnist5k-c --severities 5 --corruptions gaussian_noise fog

File names are the sample's index in the (split of the) source, which is also the index the corruption is
seeded with: OUT/<c>/<s>/<class>/<i>.png equals ``corrupt_image(source.get_image(i), c, s, seed, i)``, the
same pixels the on-the-fly streams produce. Each finished <corruption>/<severity> folder gets a
``.complete`` marker; a re-run skips complete folders and finishes incomplete ones (existing PNGs are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_path, atomic_write_text
from .corruptions import (
    ALL_CORRUPTIONS,
    SEVERITIES,
    TEST_CORRUPTIONS,
    check_corruption,
    corrupt_image,
    imagecorruptions_version,
)

COMPLETE_MARKER = ".complete"


def select_indices(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """All indices, or the first ``limit_per_class`` of every class (in source order)."""
    labels = np.asarray(labels)
    if limit_per_class is None:
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        keep.extend(np.flatnonzero(labels == c)[:limit_per_class].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def _write_png(path: Path, arr: np.ndarray) -> None:
    # not fsynced one by one (thousands of files); the domain's COMPLETE marker is written durably after them
    with atomic_path(path, durable=False) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)


def make_c(data: str, out: str | os.PathLike, corruptions=TEST_CORRUPTIONS, severities=SEVERITIES, split: str = "test",
           seed: int = 0, limit_per_class: int | None = None, split_seed: int = 0, progress: bool = True) -> dict:
    """Write the corrupted tree and its manifest; returns the manifest dict."""
    from tqdm import tqdm

    from ..classifier import library_versions
    from .sources import open_source

    corruptions = list(corruptions)
    severities = [int(s) for s in severities]
    for c in corruptions:
        for s in severities:
            check_corruption(c, s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(data, split, seed=split_seed)
    indices = select_indices(source.labels, limit_per_class)
    class_names = list(source.class_names)
    name_of = [str(n) for n in class_names]
    if len(set(name_of)) != len(name_of) or any(not n or "/" in n or n.startswith(".") for n in name_of):
        raise ValueError("class names must be unique, non-empty folder names")

    manifest_path = out / "manifest.json"
    protocol = {"source": source.describe(), "data": str(data), "split": split, "split_seed": split_seed,
                "seed": seed, "limit_per_class": limit_per_class}
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        keys = ("data", "split", "split_seed", "seed", "limit_per_class")
        mismatched = [k for k in keys if old.get(k) != protocol[k]]
        if mismatched:
            raise ValueError(f"{out} was generated with different {mismatched}; use another --out")
    todo = []
    for c in corruptions:
        for s in severities:
            d = out / c / str(s)
            if (d / COMPLETE_MARKER).is_file():
                continue
            todo.append((c, s))
    skipped = len(corruptions) * len(severities) - len(todo)
    bar = tqdm(total=len(todo) * len(indices), desc="make-c", unit="img", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for c, s in todo:
        d = out / c / str(s)
        for name in name_of:
            (d / name).mkdir(parents=True, exist_ok=True)
        bar.set_postfix(domain=f"{c}/{s}")
        for i in indices:
            label = int(source.labels[i])
            path = d / name_of[label] / f"{int(i):05d}.png"
            if not path.is_file():
                _write_png(path, corrupt_image(source.get_image(int(i)), c, s, seed=seed, index=int(i)))
            bar.update(1)
        atomic_write_text(d / COMPLETE_MARKER, json.dumps({"images": int(len(indices))}) + "\n")
    bar.close()

    all_domains = sorted({(c, s) for c in corruptions for s in severities})
    if manifest_path.is_file():
        prev = json.loads(manifest_path.read_text())
        all_domains = sorted({tuple(x) for x in prev.get("domains", [])} | set(all_domains))
    manifest = dict(
        protocol,
        layout="OUT/<corruption>/<severity>/<class>/<source index:05d>.png",
        class_names=name_of,
        images_per_domain=int(len(indices)),
        per_class=np.bincount(source.labels[indices], minlength=len(class_names)).tolist(),
        domains=[[c, s] for c, s in all_domains],
        corruption_seeding="corrupt_image(image, corruption, severity, seed, index=source index)",
        preprocessing="input converted to RGB and upscaled (bilinear) to a shorter side of >= 32 px before corrupting",
        versions=dict(library_versions(), imagecorruptions=imagecorruptions_version()),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        last_run={"written_domains": len(todo), "skipped_complete_domains": skipped,
                  "seconds": round(time.perf_counter() - t0, 1)},
    )
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)
    return manifest


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("data", help="data tools (make-c: corrupted ImageNet-C style copies of a source)")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    m = sub.add_parser("make-c", help="write OUT/<corruption>/<severity>/<class>/<image>.png + manifest.json",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--data", required=True, help="'mnist5k' or a folder DIR/<class>/<image>")
    m.add_argument("--out", required=True)
    m.add_argument("--corruptions", nargs="+", default=list(TEST_CORRUPTIONS), metavar="NAME",
                   help="corruption names, or 'test' (15), 'heldout' (4), 'all' (19); default: the 15 test ones")
    m.add_argument("--severities", nargs="+", type=int, default=list(SEVERITIES), metavar="S")
    m.add_argument("--split", default="test", choices=("train", "test", "all"))
    m.add_argument("--seed", type=int, default=0, help="corruption seed")
    m.add_argument("--split-seed", type=int, default=0, help="train/test split seed for a plain folder")
    m.add_argument("--limit-per-class", type=int, default=None)
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_run_make_c)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def expand_corruptions(names: list[str]) -> list[str]:
    from .corruptions import HELDOUT_CORRUPTIONS

    groups = {"test": list(TEST_CORRUPTIONS), "heldout": list(HELDOUT_CORRUPTIONS), "all": list(ALL_CORRUPTIONS)}
    out: list[str] = []
    for n in names:
        for x in groups.get(n, [n]):
            if x not in out:
                out.append(x)
    return out


def _run_make_c(args: argparse.Namespace) -> int:
    manifest = make_c(args.data, args.out, corruptions=expand_corruptions(args.corruptions), severities=args.severities,
                      split=args.split, seed=args.seed, limit_per_class=args.limit_per_class,
                      split_seed=args.split_seed, progress=not args.no_progress)
    run = manifest["last_run"]
    print(f"make-c: {run['written_domains']} domain(s) written, {run['skipped_complete_domains']} already complete; "
          f"{manifest['images_per_domain']} images per domain under {args.out}")
    return 0
