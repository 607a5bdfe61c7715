"""Bench data: test domains (in memory or lazy), the corrupted-image cache, the held-out validation subset, the
stream's domains in the spec's order, preprocessing into batches, and classifier loading for bench runs."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import timm.data
import torch

from ..classifier import DEFAULT_CHECKPOINTS, LoadedClassifier, default_checkpoint, load_classifier
from ..data.corruptions import check_corruption, corrupt_image, prepare_image
from ..data.imagenet_c import ImageNetC, is_domain_tree
from ..data.sources import ImageFolderSource, content_fingerprint, open_source
from ..data.streams import open_stream_source, stream_plan
from ..io import atomic_path
from ..preprocess import Preprocessor
from ..progress import progress_bar

__all__ = ["DEFAULT_CACHE_DIR", "FISHER_IMAGES", "VAL_IMAGES", "VAL_SEED", "Domain", "PreparedDomain", "card_data",
           "clean_data_for", "corrupted_images", "load_any_classifier", "source_id", "stream_domains",
           "synthetic_domains", "tree_domains", "validation_indices"]

DEFAULT_CACHE_DIR = Path(os.environ.get("MGG_CACHE_DIR", Path.home() / ".cache" / "mgg"))
VAL_IMAGES = 1000          # held-out validation subset of the TRAIN split (sweeps, MGG checkpoint selection)
VAL_SEED = 1234
FISHER_IMAGES = 512        # clean TRAIN images for EATA's Fisher


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Domain:
    """One test domain: labelled images, in memory (uint8, already corrupted) or read lazily from a source.

    ``index`` are the source indices of the rows (``images[k]`` is source sample ``index[k]``)."""

    name: str
    corruption: str
    severity: int
    labels: np.ndarray
    index: np.ndarray
    images: np.ndarray | None = None              # (N, H, W, 3) uint8
    source: Any = None                             # lazily read with get_image(source index)
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, source_idx: np.ndarray) -> np.ndarray:
        pos = {int(i): k for k, i in enumerate(self.index)}
        return np.asarray([pos[int(i)] for i in source_idx], dtype=np.int64)

    def get(self, rows: np.ndarray) -> list[np.ndarray] | np.ndarray:
        if self.images is not None:
            return self.images[rows]
        return [self.source.get_image(int(self.index[r])) for r in rows]


def corrupted_images(source, indices: np.ndarray, corruption: str, severity: int, seed: int,
                     cache_dir: str | os.PathLike | None, source_id: str, progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) of ``corrupt_image(source.get_image(i), corruption, severity, seed, index=i)`` for i in
    ``indices`` (the seeding of ``mgg data make-c`` and of ``data.streams``: the same pixels), cached as one npz
    per domain. ``corruption == "clean"`` gives the prepared clean images."""
    indices = np.asarray(indices, dtype=np.int64)
    key = _fingerprint([source_id, corruption, int(severity), int(seed), hashlib.sha1(indices.tobytes()).hexdigest()])
    path = Path(cache_dir) / f"{source_id}-{corruption}-{severity}-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["images"]
    if corruption != "clean":
        check_corruption(corruption, severity)
    out = []
    bar = progress_bar(len(indices), f"corrupt {corruption}-{severity}", enabled=progress, leave=False)
    for i in indices:
        img = source.get_image(int(i))
        out.append(prepare_image(img) if corruption == "clean"
                   else corrupt_image(img, corruption, severity, seed, int(i)))
        bar.update(1)
    bar.close()
    arr = np.stack(out)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=arr)
    return arr


def validation_indices(n_train: int, n: int = VAL_IMAGES, seed: int = VAL_SEED) -> np.ndarray:
    """The held-out validation subset of the TRAIN split (sorted indices); pretraining samples avoid it."""
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n_train)
    return np.sort(perm[: min(n, n_train)])


def _train_size(data: str) -> int:
    return len(open_source(data, "train"))


def source_id(source, split: str) -> str:
    """The cache key of a labelled source: its kind and split plus a hash of its content (file list, sizes and
    mtimes of a folder; pixels of an array), never its path (:func:`~mgg_core.data.sources.content_fingerprint`)."""
    kind = "mnist5k" if source.describe().get("kind") == "mnist5k" else "folder"
    return f"{kind}-{split}-{content_fingerprint(source)}"


def _resolve_folder(path: str, base: Path | None = None) -> str | None:
    for cand in (Path(path), (base / path) if base is not None else None):
        if cand is not None and cand.is_dir():
            return str(cand)
    return None


def card_data(clf) -> str | None:
    """The labelled dataset a classifier was trained on, as ``--data`` takes it ("mnist5k" or a folder that exists
    here), read from its card (``dataset`` and ``training.data``); None when the card names none found here."""
    card = clf.card
    ds = getattr(card, "dataset", {}) or {}
    if ds.get("kind") == "mnist5k":
        return "mnist5k"
    base = Path(clf.checkpoint_path).parent
    given = (getattr(card, "training", {}) or {}).get("data")
    if given == "mnist5k":
        return "mnist5k"
    if given and (found := _resolve_folder(str(given), base)):
        return found
    root = ds.get("root") if ds.get("kind") == "folder" else None
    if root:
        r = Path(root)
        if r.name == "train" and (r.parent / "test").is_dir():
            r = r.parent
        return _resolve_folder(str(r), base)
    return None


def clean_data_for(data: str | None, clf=None) -> tuple[str | None, str]:
    """The clean labelled dataset (with a TRAIN split) behind ``data``, and where that answer came from:
    ``data`` itself when it is "mnist5k" or a plain/split folder; the source recorded in a make-c tree's manifest;
    else the classifier's card (:func:`card_data`); (None, reason) when none is found."""
    if data is not None and (data == "mnist5k" or (Path(data).is_dir() and not is_domain_tree(data))):
        return data, "the stream's data"
    if data is not None and Path(data).is_dir():
        manifest = ImageNetC(data).manifest or {}
        src = manifest.get("data")
        if src == "mnist5k":
            return src, f"the make-c manifest of {data}"
        if src and (found := _resolve_folder(str(src), Path(data).parent)):
            return found, f"the make-c manifest of {data}"
    if clf is not None and (found := card_data(clf)) is not None:
        return found, "the classifier card"
    return None, "no clean labelled data found (not the stream's data, a make-c manifest or the classifier card)"


def tree_domains(data: str, names: Sequence[str] | None, severity: int | None) -> list:
    """Domain keys of a domain-folder tree (:meth:`~mgg_core.data.imagenet_c.ImageNetC.select`)."""
    return ImageNetC(data).select(names, severity)


def synthetic_domains(data: str, split: str, corruptions: Sequence[str], severity: int, seed: int,
                      cache_dir, indices: np.ndarray | None = None, progress: bool = False) -> list[Domain]:
    """Corrupted copies (generated once, cached) of ``indices`` of ``data`` ("mnist5k" or a folder) ``split``."""
    source = open_source(data, split)
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    sid = source_id(source, split)
    out = []
    for c in corruptions:
        imgs = corrupted_images(source, indices, c, severity, seed, cache_dir, sid, progress)
        out.append(Domain(name=f"{c}-{severity}", corruption=c, severity=severity,
                          labels=np.asarray(source.labels)[indices], index=indices, images=imgs,
                          description={"source": source.describe(), "num_samples": int(len(indices))}))
    return out


def stream_domains(spec, cache_dir, progress: bool = False) -> list[tuple[Domain, np.ndarray]]:
    """The domains of a sequential :class:`~mgg_core.data.streams.StreamSpec` with each domain's sample order
    (source indices) from the spec's own plan; on-the-fly corruptions are generated once and cached."""
    if spec.order != "sequential":
        raise ValueError("mgg bench needs a sequential stream (order='sequential'): results are per domain")
    if isinstance(spec.reset, tuple):
        raise ValueError("mgg bench supports reset 'per_domain' or 'never'")
    source = open_stream_source(spec)
    doms, plan = stream_plan(spec, source)
    orders: list[list[np.ndarray]] = [[] for _ in doms]
    for dom_ids, idx in plan:
        orders[int(dom_ids[0])].append(idx)
    out = []
    sid = None if isinstance(source, ImageNetC) else source_id(source, spec.split)
    for k, dd in enumerate(doms):
        order = np.concatenate(orders[k])
        used = np.sort(order)
        c, s = (dd.domain, 0) if isinstance(dd.domain, str) else dd.domain
        if isinstance(source, ImageNetC):
            d = Domain(dd.name, c, s, labels=dd.labels[used], index=used, source=dd.src, description=dd.src.describe())
        else:
            assert sid is not None
            imgs = corrupted_images(source, used, c, s, spec.seed, cache_dir, sid, progress)
            d = Domain(dd.name, c, s, labels=np.asarray(source.labels)[used], index=used, images=imgs,
                       description={"source": source.describe(), "num_samples": int(len(used))})
        out.append((d, order))
    return out


class PreparedDomain:
    """A domain in a fixed sample order, preprocessed for one model (in memory when small, lazily otherwise).

    ``order``: source indices in stream order (a StreamSpec plan); default: a seeded permutation."""

    MAX_IN_MEMORY = 2 ** 30  # bytes of float32 input

    def __init__(self, domain: Domain, preprocessor, order: np.ndarray | None = None, order_seed: int = 0):
        self.domain = domain
        self.pre = preprocessor
        if order is None:
            name_key = int(hashlib.sha1(domain.name.encode()).hexdigest()[:8], 16)
            gen = np.random.Generator(np.random.PCG64([order_seed, name_key]))
            self.rows = gen.permutation(len(domain))
        else:
            self.rows = domain.rows(order)
        self.y = torch.as_tensor(domain.labels[self.rows], dtype=torch.long)
        c, h, w = preprocessor.input_size
        self.x = None
        if len(self.rows) * c * h * w * 4 <= self.MAX_IN_MEMORY:
            self.x = torch.cat([self.pre(domain.get(self.rows[i:i + 512])) for i in range(0, len(self.rows), 512)])

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            if self.x is not None:
                yield self.x[i:i + batch_size], self.y[i:i + batch_size]
            else:
                yield self.pre(self.domain.get(self.rows[i:i + batch_size])), self.y[i:i + batch_size]



def load_any_classifier(classifier: str | None, model: str | None = None, weights: str | None = None,
                        num_classes: int = 1000, device: str = "cpu"):
    """A bundled/carded classifier ("vit", "resnet", a .safetensors with its card) or a plain timm model with a
    local weights file (``model`` + ``weights``; ImageNet-C)."""
    if model is None:
        if classifier is None:
            raise ValueError("give a classifier ('vit', 'resnet', a .safetensors) or --model with --weights")
        ck = default_checkpoint(classifier) if classifier in DEFAULT_CHECKPOINTS else classifier
        return load_classifier(ck, device=device)
    if weights is None:
        raise ValueError("--model needs --weights (a local file; there is no model hub here)")
    m = timm.create_model(model, pretrained=True, num_classes=num_classes,
                          pretrained_cfg_overlay=dict(file=str(Path(weights).resolve()), num_classes=num_classes))
    m.eval().requires_grad_(False)
    m.to(device)
    cfg = timm.data.resolve_data_config({}, model=m)

    class _Card:  # the small part of a ClassifierCard the bench reads
        model_name = model
        dataset = {"kind": "imagenet"}
        card_num_classes = num_classes

    # a duck-typed card (the bench reads model_name and dataset only)
    return LoadedClassifier(model=m, card=_Card(), data_config=cfg,  # type: ignore[arg-type]
                            preprocessor=Preprocessor(cfg),
                            checkpoint_path=Path(weights), device=torch.device(device))


def _clean_batches_from_folder(clf, folder: str, n: int, batch_size: int = 64, seed: int = 0):
    src = ImageFolderSource(folder)
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(len(src))[:n]
    for i in range(0, len(idx), batch_size):
        yield clf.preprocessor([src.get_image(int(j)) for j in idx[i:i + batch_size]])
