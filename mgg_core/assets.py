"""Bundled assets and their resolvers: MGG checkpoints, FOA source statistics, the default engine.

Shared by the service, ``mgg bench`` and ``mgg pretrain`` (which only meta-trains). Contract:

* ``default_mgg_checkpoint(kind)``: the bundled MGG checkpoint of a default classifier ("vit" / "resnet");
* ``mgg_checkpoint_for(classifier)``: the bundled MGG checkpoint pretrained for these weights (sha256 in its card);
* ``stats_path_for(checkpoint)``: where a classifier's FOA statistics live (``<stem>_foa_stats.safetensors``);
* ``source_stats_for(classifier)``: those statistics (checked against the weights' sha256), or computed from the
  card's clean TRAIN data when absent;
* ``mgg_loss_kwargs(checkpoint)``: the FOA-loss hyper-parameters an MGG checkpoint was trained with;
* ``default_engine(kind)``: FOA + MGG with the bundled checkpoint and statistics.

This module imports the engine but nothing imports it back from the core, so there is no cycle.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .classifier import ASSETS_DIR, default_checkpoint, file_sha256, load_classifier
from .data.corruptions import prepare_image
from .data.sources import open_source
from .engine import AdaptationEngine, EngineConfig
from .features import compute_source_stats, load_stats, save_stats
from .optim import mgg_card

__all__ = ["ASSETS_DIR", "DEFAULT_MGG_CHECKPOINTS", "STATS_SUFFIX", "clean_train_batches", "compute_foa_stats",
           "default_checkpoint", "default_engine", "default_mgg_checkpoint", "mgg_checkpoint_for",
           "mgg_loss_kwargs", "source_stats_for", "stats_path_for"]

DEFAULT_MGG_CHECKPOINTS = {
    "vit": ASSETS_DIR / "mgg_mnist5k_test_vit.safetensors",
    "resnet": ASSETS_DIR / "mgg_mnist5k_test_resnet.safetensors",
}
STATS_SUFFIX = "_foa_stats.safetensors"


def default_mgg_checkpoint(kind: str = "vit") -> Path:
    """The bundled MGG checkpoint (GML safetensors; card = same stem .json) for a default classifier."""
    try:
        return DEFAULT_MGG_CHECKPOINTS[kind]
    except KeyError:
        known = sorted(DEFAULT_MGG_CHECKPOINTS)
        raise ValueError(f"unknown default classifier {kind!r}; choose from {known}") from None


def mgg_checkpoint_for(classifier) -> Path | None:
    """The bundled MGG checkpoint that was pretrained for ``classifier`` (a LoadedClassifier or checkpoint path),
    or None. Matched by the classifier weights' sha256 recorded in the MGG card."""
    path = Path(getattr(classifier, "checkpoint_path", classifier))
    sha = file_sha256(path)
    for ckpt in DEFAULT_MGG_CHECKPOINTS.values():
        if ckpt.is_file() and mgg_card(ckpt).get("classifier", {}).get("sha256") == sha:
            return ckpt
    return None


def stats_path_for(checkpoint: str | os.PathLike) -> Path:
    """Where the FOA source statistics of a classifier checkpoint live (beside it)."""
    p = Path(checkpoint)
    return p.with_name(p.stem + STATS_SUFFIX)


def mgg_loss_kwargs(checkpoint: str | os.PathLike) -> dict:
    """FOA-loss hyper-parameters recorded in an MGG card (``loss.lambda``) when they differ from the defaults."""
    loss = mgg_card(checkpoint).get("loss", {})
    out = {}
    if "lambda" in loss and float(loss["lambda"]) != 0.4:
        out["lam"] = float(loss["lambda"])
    return out


def clean_train_batches(classifier, data: str = "mnist5k", n: int | None = None, batch_size: int = 64,
                        seed: int = 0, exclude: np.ndarray | None = None) -> Iterator[torch.Tensor]:
    """Preprocessed clean TRAIN images of ``data`` (first ``n`` of a seeded permutation) in batches."""
    src = open_source(data, "train")
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(len(src))
    if exclude is not None:
        idx = idx[~np.isin(idx, exclude)]
    if n is not None:
        idx = idx[:n]
    pre = classifier.preprocessor
    for i in range(0, len(idx), batch_size):
        yield pre(np.stack([prepare_image(src.get_image(int(j))) for j in idx[i:i + batch_size]]))


def compute_foa_stats(classifier, data: str = "mnist5k", n: int | None = None, batch_size: int = 64,
                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """FOA source statistics of ``classifier`` over clean TRAIN data (batch statistics for BatchNorm, as in
    adaptation)."""
    eng = AdaptationEngine(classifier, EngineConfig(method="foa", optimizer="sgd", device=device))
    return compute_source_stats(eng.source_features, clean_train_batches(classifier, data, n, batch_size))


def source_stats_for(classifier, data: str | None = None, device: str = "cpu", write: bool = False):
    """FOA source statistics for ``classifier`` (LoadedClassifier): the file beside its checkpoint
    (``<stem>_foa_stats.safetensors``, checked against the weights' sha256) or, when absent, computed from clean
    TRAIN data of ``data`` (default: the card's dataset if it is MNIST-5k) and written there when ``write``."""
    ckpt = Path(classifier.checkpoint_path)
    path = stats_path_for(ckpt)
    sha = file_sha256(ckpt)
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("classifier_sha256") in (None, sha):
            return load_stats(path)
    if data is None:
        kind = (getattr(classifier.card, "dataset", {}) or {}).get("kind")
        if kind != "mnist5k":
            raise FileNotFoundError(f"no FOA source statistics at {path}; give clean training data (data=...)")
        data = "mnist5k"
    stats = compute_foa_stats(classifier, data, device=device)
    if write:
        save_stats(stats, path, meta={"classifier_sha256": sha, "classifier": ckpt.name, "data": str(data),
                                       "split": "train", "images": str(int(stats["count"])),
                                       "features": "FeatureTaps of mgg_core.features (FOA taps)"})
    return stats


def default_engine(kind: str = "vit", device: str = "cpu", lr: float | None = None) -> AdaptationEngine:
    """The default engine of a bundled classifier: method "foa", optimizer "mgg" with its bundled checkpoint and
    source statistics, at the deployment step recorded in the MGG card.

    Args:
        kind: "vit" or "resnet" (a bundled classifier).
        device: torch device string.
        lr: MGG step size; None takes the card's deployment step.
    """
    clf = load_classifier(default_checkpoint(kind), device=device)
    ckpt = default_mgg_checkpoint(kind)
    cfg = EngineConfig(method="foa", optimizer="mgg", lr=lr, mgg_checkpoint=str(ckpt), device=device,
                       method_kwargs=mgg_loss_kwargs(ckpt))
    return AdaptationEngine(clf, cfg, source_stats=source_stats_for(clf, device=device))
