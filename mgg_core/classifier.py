"""Source classifiers: a JSON card beside a safetensors checkpoint, loaded through timm's pretrained path.

A checkpoint is ``NAME.safetensors`` (the model's state dict) plus ``NAME.json`` (a :class:`ClassifierCard`).
:func:`load_classifier` builds the model with
``timm.create_model(card.model_name, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=PATH,
...), **card.model_kwargs)``, i.e. timm itself loads and checks the weights (offline: set HF_HUB_OFFLINE=1),
and timm resolves the data config (mean/std/input size/interpolation/crop) from the overlay, which comes
from the card. Bundled defaults (trained on MNIST-5k by ``mgg train-source``) are found with
:func:`default_checkpoint`.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .io import atomic_path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_CHECKPOINTS = {
    "vit": ASSETS_DIR / "mnist5k_test_vit.safetensors",
    "resnet": ASSETS_DIR / "mnist5k_test_resnet.safetensors",
}


@dataclass
class ClassifierCard:
    """Everything needed to rebuild, preprocess for and judge a source classifier."""

    model_name: str
    num_classes: int
    class_names: list[str]
    input_size: list[int]  # [C, H, W]
    mean: list[float]
    std: list[float]
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    dataset: dict[str, Any] = field(default_factory=dict)  # name, description, origin, licence, ...
    split: dict[str, Any] = field(default_factory=dict)  # train/test rule, seed, sizes
    seed: int | None = None
    clean_test_accuracy: float | None = None  # percent on split["test"]
    training: dict[str, Any] = field(default_factory=dict)  # epochs, optimizer, lr, augmentation, time, ...
    versions: dict[str, str] = field(default_factory=dict)  # torch, timm, numpy, ...
    created: str = ""  # ISO-8601 UTC
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        self.input_size = [int(v) for v in self.input_size]
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]
        self.class_names = [str(c) for c in self.class_names]
        if len(self.input_size) != 3:
            raise ValueError("input_size must be [C, H, W]")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if len(self.mean) != self.input_size[0] or len(self.std) != self.input_size[0]:
            raise ValueError("mean/std need one value per input channel")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown card fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ClassifierCard:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json())
            os.chmod(tmp, 0o644)                 # a published card (atomic_path's temp file is 0600)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassifierCard:
        return cls.from_json(Path(path).read_text())

    def data_config(self) -> dict[str, Any]:
        """The timm data config this card describes (what the preprocessor needs)."""
        return {
            "input_size": tuple(self.input_size),
            "interpolation": self.interpolation,
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "crop_pct": float(self.crop_pct),
            "crop_mode": self.crop_mode,
        }

    @staticmethod
    def now() -> str:
        return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def card_path_for(checkpoint: str | os.PathLike) -> Path:
    return Path(checkpoint).with_suffix(".json")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import PIL
    import timm
    import torchvision

    try:
        mgg = version("mgg-tta")
    except PackageNotFoundError:
        mgg = "unknown"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "pillow": PIL.__version__, "mgg-tta": mgg}


@dataclass
class LoadedClassifier:
    model: torch.nn.Module  # eval mode, every parameter requires_grad=False
    card: ClassifierCard
    data_config: dict[str, Any]  # timm's resolved data config
    preprocessor: Any  # mgg_core.preprocess.Preprocessor
    checkpoint_path: Path
    device: torch.device = torch.device("cpu")

    @property
    def num_classes(self) -> int:
        return self.card.num_classes

    @property
    def class_names(self) -> list[str]:
        return self.card.class_names

    @torch.no_grad()
    def predict_logits(self, images, batch_size: int = 256) -> torch.Tensor:
        """Logits (N, C) on the CPU for images (anything the preprocessor accepts), with the frozen model."""
        x = self.preprocessor(images)
        outs = [self.model(x[i:i + batch_size].to(self.device)).float().cpu() for i in range(0, len(x), batch_size)]
        return torch.cat(outs)


def build_model(card: ClassifierCard, checkpoint: str | os.PathLike | None, device: str | torch.device = "cpu"):
    """timm model from the card; with ``checkpoint``, weights are loaded by timm's pretrained machinery."""
    import timm

    kwargs = dict(card.model_kwargs)
    if checkpoint is None:
        return timm.create_model(card.model_name, pretrained=False, num_classes=card.num_classes, **kwargs).to(device)
    overlay = dict(
        file=str(Path(checkpoint).resolve()),
        num_classes=card.num_classes,
        mean=tuple(card.mean),
        std=tuple(card.std),
        input_size=tuple(card.input_size),
        crop_pct=float(card.crop_pct),
        crop_mode=card.crop_mode,
        interpolation=card.interpolation,
    )
    model = timm.create_model(card.model_name, pretrained=True, num_classes=card.num_classes,
                              pretrained_cfg_overlay=overlay, **kwargs)
    return model.to(device)


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedClassifier:
    """Load ``path`` (.safetensors) and its card (same stem, .json) onto ``device``; frozen, eval mode."""
    import timm.data

    from .preprocess import Preprocessor

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"expected a .safetensors checkpoint, got {path}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    card_file = card_path_for(path)
    if not card_file.is_file():
        raise FileNotFoundError(f"classifier card {card_file} not found beside the checkpoint")
    card = ClassifierCard.load(card_file)
    device = torch.device(device)
    model = build_model(card, path, device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    data_config = timm.data.resolve_data_config({}, model=model)
    if tuple(data_config["input_size"]) != tuple(card.input_size):
        raise RuntimeError(f"timm resolved input size {data_config['input_size']} != card {card.input_size}")
    return LoadedClassifier(model=model, card=card, data_config=data_config, preprocessor=Preprocessor(data_config),
                            checkpoint_path=path, device=device)


def default_checkpoint(kind: str = "vit") -> Path:
    """Path of a bundled checkpoint: ``"vit"`` (timm test_vit, LayerNorm) or ``"resnet"`` (test_resnet, BatchNorm)."""
    try:
        return DEFAULT_CHECKPOINTS[kind]
    except KeyError:
        raise ValueError(f"unknown default checkpoint {kind!r}; choose from {sorted(DEFAULT_CHECKPOINTS)}") from None
