"""`mgg train-source`: train a small timm classifier on a labelled source and write CKPT + card.

    mgg train-source --data mnist5k --model test_resnet --out mgg_core/assets/mnist5k_test_resnet.safetensors

The training images are decoded once and passed through the same timm eval transform the deployed model
uses (``Preprocessor``, at ``--img-size``), the normalisation mean/std are measured on the training split,
and training runs on those tensors with light, seeded augmentation (small random affine: rotation,
scale, translation). Each epoch ends with a training checkpoint (``CKPT`` stem + ``.train-state.pt``:
model, optimizer, epoch); ``--resume`` continues from it and gives the same weights as an uninterrupted
run (batch order and augmentation are drawn from per-epoch seeded generators). At the end the weights go
to ``CKPT`` (.safetensors), the card to the .json beside it, and the clean test accuracy written to the card
is measured by loading the written files back through :func:`mgg_core.classifier.load_classifier`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from .classifier import ClassifierCard, LoadedClassifier, file_sha256, library_versions, load_classifier
from .cli import add_config_arguments, add_threads_argument, config_kwargs
from .data.corruptions import corrupt_image
from .data.sources import LabelledSource, open_source
from .io import atomic_path
from .preprocess import Preprocessor

__all__ = ["AUGMENTATIONS", "OPTIMIZERS", "TrainSourceConfig", "accuracy", "add_parser", "evaluate_classifier",
           "run_train_source", "train_source", "train_state_path"]

# optimizer name -> factory(param groups, lr); the card records the name
OPTIMIZERS: dict[str, Callable[[list[dict], float], torch.optim.Optimizer]] = {
    "adamw": lambda groups, lr: torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999)),
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True),
}
# augmentation name -> the description the card records (None: no augmentation)
AUGMENTATIONS: dict[str, str | None] = {
    "affine": "random affine: rotation +-10 deg, scale 0.9-1.1, shift +-2 px",
    "none": None,
}


def _arg(help: str, **kw) -> dict:
    """Field metadata the CLI reads (``mgg_core.cli.add_config_arguments``): each parameter is written once."""
    return dict(kw, help=help)


@dataclass(frozen=True)
class TrainSourceConfig:
    """One ``mgg train-source`` job (the protocol in the module docstring); flags are built from the field metadata.

    ``stop_after_epochs=K`` ends the run after K more epochs, leaving only the training state (a time-sliced
    run; continue with ``resume=True``).
    """

    data: str = field(default="mnist5k", metadata=_arg(
        "'mnist5k' or a folder DIR/<class>/<image> (or DIR/train/<class>/... and DIR/test/<class>/...)"))
    model_name: str = field(default="test_resnet", metadata=_arg(
        "timm model name (e.g. test_resnet, test_vit)", flag="--model", metavar="MODEL"))
    out: str | os.PathLike = field(default="model.safetensors", metadata=_arg(
        "output checkpoint (.safetensors); the card goes beside it (.json)", required=True))
    epochs: int = field(default=10, metadata=_arg("training epochs", type=int))
    batch_size: int = field(default=128, metadata=_arg("training batch", type=int))
    lr: float = field(default=2e-3, metadata=_arg("peak learning rate (linear warmup, then cosine)", type=float))
    weight_decay: float = field(default=0.05, metadata=_arg(
        "weight decay (not on biases, norms, pos_embed, cls_token)", type=float))
    optimizer: str = field(default="adamw", metadata=_arg("optimizer", choices=tuple(OPTIMIZERS)))
    warmup_epochs: float = field(default=1.0, metadata=_arg("linear warmup length in epochs", type=float))
    label_smoothing: float = field(default=0.0, metadata=_arg("cross-entropy label smoothing", type=float))
    augment: str = field(default="affine", metadata=_arg("training augmentation", choices=tuple(AUGMENTATIONS)))
    seed: int = field(default=0, metadata=_arg("initialisation, batch order and augmentation seed", type=int))
    split_seed: int = field(default=0, metadata=_arg(
        "seed of the train/test split of a plain folder (MNIST-5k has a fixed split)", type=int))
    img_size: int = field(default=32, metadata=_arg("input size (square)", type=int))
    model_kwargs: dict | None = field(default=None, metadata=_arg(
        'JSON, e.g. \'{"patch_size": 4}\'', type=json.loads))
    resume: bool = field(default=False, metadata=_arg(
        "continue from the per-epoch training state if present", action="store_true"))
    stop_after_epochs: int | None = field(default=None, metadata=_arg(
        "run at most this many epochs now and keep the training state (continue with --resume)", type=int))
    keep_train_state: bool = field(default=False, metadata=_arg(
        "keep the .train-state.pt file at the end", action="store_true"))
    device: str = field(default="cpu", metadata=_arg("torch device"))
    quiet: bool = field(default=False, metadata=_arg("no log lines", action="store_true"))
    progress: bool = True

    def __post_init__(self) -> None:
        if Path(self.out).suffix != ".safetensors":
            raise ValueError("--out must end in .safetensors")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {', '.join(map(repr, AUGMENTATIONS))}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))}")
        for name in ("epochs", "batch_size", "img_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")
        if self.stop_after_epochs is not None and self.stop_after_epochs < 0:
            raise ValueError(f"stop_after_epochs must be >= 0, not {self.stop_after_epochs}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(out=str(self.out), model_kwargs=dict(self.model_kwargs or {}))
        return d

    def settings(self, model_kwargs: dict) -> dict:
        """What the card's ``training`` and the training state record (``model_kwargs`` as the model was built)."""
        return {"data": str(self.data), "model": self.model_name, "model_kwargs": model_kwargs, "epochs": self.epochs,
                "batch_size": self.batch_size, "lr": self.lr, "weight_decay": self.weight_decay,
                "optimizer": self.optimizer, "warmup_epochs": self.warmup_epochs,
                "label_smoothing": self.label_smoothing, "seed": self.seed, "split_seed": self.split_seed,
                "img_size": self.img_size, "augment": self.augment}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def train_state_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".train-state.pt")


def _make_model(model_name: str, num_classes: int, model_kwargs: dict, img_size: int) -> tuple[torch.nn.Module, dict]:
    """Build the timm model; models with a fixed input size (ViTs) get ``img_size`` unless given."""
    kwargs = dict(model_kwargs)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    pretrained_cfg = cast(dict, model.pretrained_cfg)  # timm sets it on every model it creates
    if pretrained_cfg.get("fixed_input_size") and "img_size" not in kwargs:
        kwargs["img_size"] = img_size
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    return model, kwargs


def _preprocess_all(source: LabelledSource, preprocessor: Preprocessor,
                    chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    xs = []
    for i in range(0, len(source), chunk):
        xs.append(preprocessor([source.get_image(j) for j in range(i, min(i + chunk, len(source)))]))
    return torch.cat(xs), torch.as_tensor(np.asarray(source.labels), dtype=torch.long)


def _augment(x: torch.Tensor, gen: torch.Generator, fill: torch.Tensor, max_deg: float = 10.0,
             scale: tuple[float, float] = (0.9, 1.1), max_shift_px: float = 2.0) -> torch.Tensor:
    """Random affine per image (rotation, isotropic scale, translation); outside pixels get ``fill``."""
    n, _, h, w = x.shape
    u = torch.rand(n, 4, generator=gen)
    angle = (u[:, 0] * 2 - 1) * math.radians(max_deg)
    s = scale[0] + u[:, 1] * (scale[1] - scale[0])
    tx = (u[:, 2] * 2 - 1) * (2 * max_shift_px / w)
    ty = (u[:, 3] * 2 - 1) * (2 * max_shift_px / h)
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    fill = fill.view(1, -1, 1, 1)
    return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if warmup > 0 and step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: str | torch.device,
             batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on preprocessed tensors."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return 100.0 * correct / max(1, len(x))


def evaluate_classifier(clf: LoadedClassifier, source: LabelledSource, corruption: str | None = None,
                        severity: int = 5, seed: int = 0, batch_size: int = 500) -> float:
    """Accuracy (%) of a LoadedClassifier on a source, clean or with an on-the-fly corruption."""
    correct = 0
    for i in range(0, len(source), batch_size):
        idx = range(i, min(i + batch_size, len(source)))
        if corruption is None:
            imgs = [source.get_image(j) for j in idx]
        else:
            imgs = [corrupt_image(source.get_image(j), corruption, severity, seed=seed, index=j) for j in idx]
        pred = clf.predict_logits(imgs).argmax(1).numpy()
        correct += int((pred == np.asarray(source.labels)[list(idx)]).sum())
    return 100.0 * correct / max(1, len(source))


def train_source(**kwargs: Any) -> ClassifierCard | None:
    """``run_train_source(TrainSourceConfig(**kwargs))`` (the fields of :class:`TrainSourceConfig`)."""
    return run_train_source(TrainSourceConfig(**kwargs))


def run_train_source(cfg: TrainSourceConfig) -> ClassifierCard | None:
    """Train and write ``cfg.out`` (.safetensors) + card (.json). Returns the :class:`ClassifierCard`, or None
    when ``cfg.stop_after_epochs`` ended the run early (only the training state is written then)."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clock = (time.perf_counter(), time.process_time())
    data = _load_data(cfg)
    torch.manual_seed(cfg.seed)
    model, model_kwargs = _make_model(cfg.model_name, len(data.class_names), dict(cfg.model_kwargs or {}),
                                      cfg.img_size)
    model.to(torch.device(cfg.device))
    run = _Run(cfg, data, model, _make_optimizer(cfg, model), cfg.settings(model_kwargs), train_state_path(out))
    _resume(run)
    end_epoch, train_time = _train(run)
    if end_epoch < cfg.epochs:
        _log(f"stopped after epoch {end_epoch}/{cfg.epochs}; training state in {run.state_file} "
             "(continue with --resume)", cfg.quiet)
        return None
    card = _write_and_check(run, out, train_time, clock)
    if not cfg.keep_train_state and run.state_file.exists():
        run.state_file.unlink()
    _log(f"{cfg.model_name}: clean test accuracy {card.clean_test_accuracy:.2f}% ({len(data.test_src)} images), "
         f"trained in {train_time:.1f}s; wrote {out} and {out.with_suffix('.json')}", cfg.quiet)
    return card


@dataclass
class _Data:
    """The decoded, preprocessed training and test tensors and the normalisation measured on the training split."""

    train_src: LabelledSource
    test_src: LabelledSource
    class_names: list[str]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: list[float]
    std: list[float]
    fill: torch.Tensor  # a black pixel after normalisation


def _load_data(cfg: TrainSourceConfig) -> _Data:
    """Decode + resize once through the eval transform with identity normalisation, measure mean/std (rounded to
    4 digits, as the card keeps them), normalise the training tensors and preprocess the test split."""
    train_src = open_source(cfg.data, "train", seed=cfg.split_seed)
    test_src = open_source(cfg.data, "test", seed=cfg.split_seed)
    base_cfg = {"input_size": (3, cfg.img_size, cfg.img_size), "interpolation": "bilinear", "mean": (0.0,) * 3,
                "std": (1.0,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    x_train01, y_train = _preprocess_all(train_src, Preprocessor(base_cfg))
    mean_l = [round(float(v), 4) for v in x_train01.mean(dim=(0, 2, 3))]
    std_l = [round(float(v), 4) for v in x_train01.std(dim=(0, 2, 3)).clamp_min(1e-3)]
    m_t = torch.tensor(mean_l).view(1, -1, 1, 1)
    s_t = torch.tensor(std_l).view(1, -1, 1, 1)
    x_train = (x_train01 - m_t) / s_t
    del x_train01
    x_test, y_test = _preprocess_all(test_src, Preprocessor(dict(base_cfg, mean=tuple(mean_l), std=tuple(std_l))))
    return _Data(train_src, test_src, list(train_src.class_names), x_train, y_train, x_test, y_test, mean_l, std_l,
                 (-m_t / s_t).view(-1))


def _make_optimizer(cfg: TrainSourceConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over two groups: weight decay on weight matrices, none on vectors, pos_embed, cls_token."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return OPTIMIZERS[cfg.optimizer](groups, cfg.lr)


@dataclass
class _Run:
    """One training run: what an epoch advances and the per-epoch state file keeps."""

    cfg: TrainSourceConfig
    data: _Data
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    settings: dict
    state_file: Path
    start_epoch: int = 0
    elapsed_before: float = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.x_train) / self.cfg.batch_size)


def _resume(run: _Run) -> None:
    """With ``resume``, load model, optimizer and epoch from the state file if it exists and was written with the
    same settings (the epoch count may differ)."""
    cfg, state_file = run.cfg, run.state_file
    if not cfg.resume:
        return
    if not state_file.is_file():
        _log(f"--resume: no training state at {state_file}, starting from scratch", cfg.quiet)
        return
    st = torch.load(state_file, map_location="cpu", weights_only=False)

    def but_epochs(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "epochs"}

    if but_epochs(st["settings"]) != but_epochs(run.settings):
        raise ValueError(f"{state_file} was written with different settings: {st['settings']}")
    run.model.load_state_dict(st["model"])
    run.opt.load_state_dict(st["optimizer"])
    run.start_epoch = int(st["epoch"])
    run.elapsed_before = float(st.get("train_time_s", 0.0))
    _log(f"resuming from {state_file} after epoch {run.start_epoch}", cfg.quiet)


def _train(run: _Run) -> tuple[int, float]:
    """Run the epochs from ``run.start_epoch`` (at most ``stop_after_epochs`` of them), writing the training state
    after each. Returns the epoch reached and the training time (including the resumed part)."""
    cfg, spe = run.cfg, run.steps_per_epoch
    t_train = time.perf_counter()
    bar = tqdm(total=cfg.epochs * spe, initial=run.start_epoch * spe, desc=f"train {cfg.model_name}",
               unit="step", disable=not cfg.progress or cfg.quiet, dynamic_ncols=True)
    end_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs,
                                                                     run.start_epoch + int(cfg.stop_after_epochs))
    for epoch in range(run.start_epoch, end_epoch):
        mean_loss = _train_epoch(run, epoch, bar)
        elapsed = run.elapsed_before + time.perf_counter() - t_train
        with atomic_path(run.state_file) as tmp:
            torch.save({"settings": run.settings, "epoch": epoch + 1, "model": run.model.state_dict(),
                        "optimizer": run.opt.state_dict(), "train_time_s": elapsed}, tmp)
        if not bar.disable:
            bar.write(f"epoch {epoch + 1}/{cfg.epochs}: train loss {mean_loss:.4f}")
    bar.close()
    return end_epoch, run.elapsed_before + time.perf_counter() - t_train


def _train_epoch(run: _Run, epoch: int, bar: tqdm) -> float:
    """One epoch; batch order and augmentation come from a generator seeded by (seed, epoch), so a resumed run
    draws what an uninterrupted one would. Returns the mean training loss."""
    cfg, data, spe = run.cfg, run.data, run.steps_per_epoch
    device = torch.device(cfg.device)
    total_steps, warmup_steps = cfg.epochs * spe, int(round(cfg.warmup_epochs * spe))
    run.model.train()
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    perm = torch.randperm(len(data.x_train), generator=gen)
    loss_sum, n_seen = 0.0, 0
    for b in range(spe):
        step = epoch * spe + b
        idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        xb, yb = data.x_train[idx], data.y_train[idx]
        if AUGMENTATIONS[cfg.augment] is not None:
            xb = _augment(xb, gen, data.fill)
        for g in run.opt.param_groups:
            g["lr"] = _lr_at(step, total_steps, warmup_steps, cfg.lr)
        loss = F.cross_entropy(run.model(xb.to(device)), yb.to(device), label_smoothing=cfg.label_smoothing)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        loss_sum += loss.item() * len(idx)
        n_seen += len(idx)
        bar.update(1)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / n_seen:.3f}")
    return loss_sum / n_seen


def _write_and_check(run: _Run, out: Path, train_time: float, clock: tuple[float, float]) -> ClassifierCard:
    """Write weights + card, then measure the card's accuracy through the deployed loading path (it must agree
    with the in-memory model's) and write the card again with it."""
    cfg, data, device = run.cfg, run.data, torch.device(run.cfg.device)
    run.model.eval()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in run.model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "model": cfg.model_name})
        os.chmod(tmp, 0o644)
    in_memory_acc = accuracy(run.model, data.x_test, data.y_test, device)
    card = _card(run, out, train_time)
    card.save(out.with_suffix(".json"))
    acc = evaluate_classifier(load_classifier(out, device=device), data.test_src)
    if abs(acc - in_memory_acc) > 0.05:
        raise RuntimeError(f"accuracy after reload {acc:.2f} differs from in-memory {in_memory_acc:.2f}")
    card.clean_test_accuracy = round(acc, 2)
    card.training["total_time_s"] = round(time.perf_counter() - clock[0], 1)
    card.training["process_cpu_time_s"] = round(time.process_time() - clock[1], 1)
    card.save(out.with_suffix(".json"))
    return card


def _card(run: _Run, out: Path, train_time: float) -> ClassifierCard:
    cfg, data = run.cfg, run.data
    return ClassifierCard(
        model_name=cfg.model_name, model_kwargs=run.settings["model_kwargs"], num_classes=len(data.class_names),
        class_names=data.class_names, input_size=[3, cfg.img_size, cfg.img_size], mean=data.mean, std=data.std,
        interpolation="bilinear", crop_pct=1.0, crop_mode="center", dataset=_dataset_info(data.train_src),
        split={"train": len(data.train_src), "test": len(data.test_src), "split_seed": cfg.split_seed,
               "rule": data.train_src.describe().get("split_rule", "train/ and test/ folders")},
        seed=cfg.seed, clean_test_accuracy=None,
        training=dict(run.settings, schedule="linear warmup + cosine", train_time_s=round(train_time, 1),
                      device=str(torch.device(cfg.device)), torch_threads=torch.get_num_threads(),
                      augmentation=AUGMENTATIONS[cfg.augment] or "none", resumed=run.start_epoch > 0),
        versions=library_versions(), created=ClassifierCard.now(), weights_sha256=file_sha256(out))


def _dataset_info(src: LabelledSource) -> dict:
    d = src.describe()
    keep = ("name", "description", "origin", "licence", "subset_from", "kind", "root")
    return {k: d[k] for k in keep if k in d}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-source", help="train a small timm source classifier (CKPT .safetensors + card)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, TrainSourceConfig)
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_argument(p, default=2, help="torch CPU threads (default 2, as the bundled models were trained): CPU "
                         "training is bit-reproducible only at the same thread count, which the card records")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    run_train_source(TrainSourceConfig(**config_kwargs(TrainSourceConfig, args)))
    return 0
