"""Feature taps for the FOA-style discrepancy loss, and the source statistics they are compared with.

For a timm ViT (``blocks`` each with ``norm1``, a final ``norm``) the taps are the method's: the CLS token after
every block, normed by the next block's norm1, the last one by the final norm (so the adapted LayerNorm affines
shape the features). For other models the taps are the stage outputs named in timm's ``feature_info``, pooled over
space (or over tokens). Taps record into a thread-local collector, so concurrent streams never mix features.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_path

_local = threading.local()


def _collector() -> list | None:
    return getattr(_local, "features", None)


class FeatureTaps:
    def __init__(self, model: nn.Module):
        self.model = model
        self.module_names, self.token_mode = self._choose(model)
        modules = dict(model.named_modules())
        self._handles = [modules[n].register_forward_hook(self._hook) for n in self.module_names]

    @staticmethod
    def _choose(model: nn.Module) -> tuple[list[str], str]:
        blocks = getattr(model, "blocks", None)
        if (isinstance(blocks, nn.Sequential) and len(blocks) > 0 and all(hasattr(b, "norm1") for b in blocks)
                and isinstance(getattr(model, "norm", None), nn.Module)):
            names = [f"blocks.{i}.norm1" for i in range(1, len(blocks))] + ["norm"]
            prefix = int(getattr(model, "num_prefix_tokens", 0))
            pool = getattr(model, "global_pool", "token")
            return names, ("first" if prefix > 0 and pool == "token" else "mean")
        info = getattr(model, "feature_info", None)
        if info:
            entries = info if isinstance(info, list) else list(info.info)
            names = [e["module"] for e in entries if e.get("module")]
            if names:
                return names, "mean"
        raise ValueError(f"cannot choose feature taps for {type(model).__name__}: no ViT blocks and no feature_info")

    def _hook(self, module, inputs, output):
        sink = _collector()
        if sink is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.dim() == 4:  # N, C, H, W (or N, H, W, C for channels-last ViT variants)
            sink.append(out.mean(dim=(2, 3)))
        elif out.dim() == 3:  # N, L, D
            sink.append(out[:, 0] if self.token_mode == "first" else out.mean(dim=1))
        else:
            sink.append(out.reshape(out.shape[0], -1))

    @contextmanager
    def collect(self) -> Iterator[list]:
        prev = _collector()
        sink: list = []
        _local.features = sink
        try:
            yield sink
        finally:
            _local.features = prev

    @staticmethod
    def concat(sink: list) -> torch.Tensor:
        return torch.cat(sink, dim=1)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def compute_source_stats(forward, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-dimension mean and std of the tapped features over clean source data.

    ``forward(x) -> features (N, D)`` (e.g. ``engine.source_features``); ``batches`` yields preprocessed tensors.
    """
    feats = [forward(x).float().cpu() for x in batches]
    if not feats:
        raise ValueError("no clean batches given to compute source statistics")
    all_feats = torch.cat(feats)
    if all_feats.shape[0] < 2:
        raise ValueError("source statistics need at least 2 clean samples")
    std, mean = torch.std_mean(all_feats, dim=0)
    return {"mean": mean, "std": std, "count": torch.tensor(all_feats.shape[0])}


def save_stats(stats: dict[str, torch.Tensor], path: str | Path, meta: dict[str, str] | None = None) -> None:
    """Write ``stats`` (safetensors, world-readable) atomically: a reader sees the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in stats.items()}, str(tmp), metadata=meta or {})
        os.chmod(tmp, 0o644)


def load_stats(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
