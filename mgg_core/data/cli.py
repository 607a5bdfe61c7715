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
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..classifier import library_versions
from ..io import atomic_path, atomic_write_text
from .corruptions import (
    ALL_CORRUPTIONS,
    DEFAULT_PROFILE,
    HELDOUT_CORRUPTIONS,
    PROFILES,
    SEVERITIES,
    TEST_CORRUPTIONS,
    check_corruption,
    check_profile,
    corrupt_image,
    imagecorruptions_version,
    profile_version,
)
from .sources import LabelledSource, open_source

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


def make_c(data: str, out: str | os.PathLike, corruptions: Iterable[str] = TEST_CORRUPTIONS,
           severities: Iterable[int] = SEVERITIES, split: str = "test", seed: int = 0,
           limit_per_class: int | None = None, split_seed: int = 0, progress: bool = True,
           profile: str = DEFAULT_PROFILE) -> dict:
    """Write the corrupted tree and its manifest; returns the manifest dict.

    Args:
        data: ``"mnist5k"`` or a folder of labelled images (see :func:`mgg_core.data.sources.open_source`).
        out: the tree's root; a re-run with the same protocol skips complete domains.
        corruptions, severities: the domains to write.
        split, split_seed: which part of the source (and the seed of a plain folder's train/test split).
        seed: the corruption seed (each image is also seeded with its source index).
        limit_per_class: keep only the first N images of every class.
        progress: show a progress bar.
        profile: corruption constants, ``"imagenet-c"`` (224 px photos) or ``"cifar-c"`` (32 px images).
    """
    check_profile(profile)
    corruptions = list(corruptions)
    severities = [int(s) for s in severities]
    for c in corruptions:
        for s in severities:
            check_corruption(c, s)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = open_source(data, split, seed=split_seed)
    indices = select_indices(source.labels, limit_per_class)
    name_of = _class_folder_names(source)
    manifest_path = out / "manifest.json"
    protocol = {"source": source.describe(), "data": str(data), "split": split, "split_seed": split_seed,
                "seed": seed, "limit_per_class": limit_per_class, "profile": profile}
    _check_same_protocol(manifest_path, protocol)
    todo = [(c, s) for c in corruptions for s in severities if not (out / c / str(s) / COMPLETE_MARKER).is_file()]
    t0 = time.perf_counter()
    _write_domains(out, todo, source, indices, name_of, seed, progress, profile)
    all_domains = sorted({(c, s) for c in corruptions for s in severities})
    if manifest_path.is_file():
        prev = json.loads(manifest_path.read_text())
        all_domains = sorted({tuple(x) for x in prev.get("domains", [])} | set(all_domains))
    manifest = dict(
        protocol,
        layout="OUT/<corruption>/<severity>/<class>/<source index:05d>.png",
        class_names=name_of,
        images_per_domain=int(len(indices)),
        per_class=np.bincount(source.labels[indices], minlength=len(name_of)).tolist(),
        domains=[[c, s] for c, s in all_domains],
        corruption_seeding="corrupt_image(image, corruption, severity, seed, index=source index, profile)",
        preprocessing="input converted to RGB and upscaled (bilinear) to a shorter side of >= 32 px before corrupting",
        versions=dict(library_versions(), imagecorruptions=imagecorruptions_version(),
                      corruptions=profile_version(profile)),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        last_run={"written_domains": len(todo), "skipped_complete_domains": len(corruptions) * len(severities)
                  - len(todo), "seconds": round(time.perf_counter() - t0, 1)},
    )
    with atomic_path(manifest_path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o644)
    return manifest


def _class_folder_names(source: LabelledSource) -> list[str]:
    """The class names as folder names; they must be unique, non-empty, without '/' and not hidden."""
    name_of = [str(n) for n in source.class_names]
    if len(set(name_of)) != len(name_of) or any(not n or "/" in n or n.startswith(".") for n in name_of):
        raise ValueError("class names must be unique, non-empty folder names")
    return name_of


def _check_same_protocol(manifest_path: Path, protocol: dict) -> None:
    """A tree is only ever extended with the protocol it was started with."""
    if not manifest_path.is_file():
        return
    old = json.loads(manifest_path.read_text())
    keys = ("data", "split", "split_seed", "seed", "limit_per_class", "profile")
    mismatched = [k for k in keys if old.get(k, DEFAULT_PROFILE if k == "profile" else None) != protocol[k]]
    if mismatched:
        raise ValueError(f"{manifest_path.parent} was generated with different {mismatched}; use another --out")


def _write_domains(out: Path, todo: Sequence[tuple[str, int]], source: LabelledSource, indices: np.ndarray,
                   name_of: list[str], seed: int, progress: bool, profile: str = DEFAULT_PROFILE) -> None:
    """Write the PNGs of each (corruption, severity) in ``todo`` (keeping existing ones), then its marker."""
    bar = tqdm(total=len(todo) * len(indices), desc="make-c", unit="img", disable=not progress, dynamic_ncols=True)
    for c, s in todo:
        d = out / c / str(s)
        for name in name_of:
            (d / name).mkdir(parents=True, exist_ok=True)
        bar.set_postfix(domain=f"{c}/{s}")
        for i in indices:
            label = int(source.labels[i])
            path = d / name_of[label] / f"{int(i):05d}.png"
            if not path.is_file():
                _write_png(path, corrupt_image(source.get_image(int(i)), c, s, seed=seed, index=int(i),
                                                 profile=profile))
            bar.update(1)
        atomic_write_text(d / COMPLETE_MARKER, json.dumps({"images": int(len(indices))}) + "\n")
    bar.close()


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
    m.add_argument("--profile", default=DEFAULT_PROFILE, choices=PROFILES,
                   help="corruption constants: imagenet-c (224 px photos, default) or cifar-c (CIFAR-10-C's, 32 px)")
    m.add_argument("--no-progress", action="store_true")
    m.set_defaults(func=_run_make_c)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def expand_corruptions(names: list[str]) -> list[str]:
    """Corruption names with the groups 'test', 'heldout' and 'all' expanded, duplicates dropped, order kept."""
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
                      split_seed=args.split_seed, progress=not args.no_progress, profile=args.profile)
    run = manifest["last_run"]
    print(f"make-c: {run['written_domains']} domain(s) written, {run['skipped_complete_domains']} already complete; "
          f"{manifest['images_per_domain']} images per domain under {args.out}")
    return 0
