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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .cli import add_threads_argument
from .io import atomic_path

DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": 128,
    "lr": 2e-3,
    "weight_decay": 0.05,
    "optimizer": "adamw",
    "warmup_epochs": 1.0,
    "label_smoothing": 0.0,
    "img_size": 32,
    "seed": 0,
    "split_seed": 0,
    "augment": "affine",
}


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def train_state_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".train-state.pt")


def _make_model(model_name: str, num_classes: int, model_kwargs: dict, img_size: int) -> tuple[torch.nn.Module, dict]:
    """Build the timm model; models with a fixed input size (ViTs) get ``img_size`` unless given."""
    import timm

    kwargs = dict(model_kwargs)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    if model.pretrained_cfg.get("fixed_input_size") and "img_size" not in kwargs:
        kwargs["img_size"] = img_size
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    return model, kwargs


def _preprocess_all(source, preprocessor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
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
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch_size: int = 500) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode) on preprocessed tensors."""
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return 100.0 * correct / max(1, len(x))


def evaluate_classifier(clf, source, corruption: str | None = None, severity: int = 5, seed: int = 0,
                        batch_size: int = 500) -> float:
    """Accuracy (%) of a LoadedClassifier on a source, clean or with an on-the-fly corruption."""
    from .data.corruptions import corrupt_image

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


def train_source(data: str = "mnist5k", model_name: str = "test_resnet", out: str | os.PathLike = "model.safetensors",
                 epochs: int = DEFAULTS["epochs"], batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
                 weight_decay: float = DEFAULTS["weight_decay"], optimizer: str = DEFAULTS["optimizer"],
                 warmup_epochs: float = DEFAULTS["warmup_epochs"], label_smoothing: float = DEFAULTS["label_smoothing"],
                 seed: int = DEFAULTS["seed"], split_seed: int = DEFAULTS["split_seed"],
                 img_size: int = DEFAULTS["img_size"],
                 model_kwargs: dict | None = None, augment: str = DEFAULTS["augment"], resume: bool = False,
                 device: str | torch.device = "cpu", keep_train_state: bool = False, quiet: bool = False,
                 progress: bool = True, stop_after_epochs: int | None = None):
    """Train and write ``out`` (.safetensors) + card (.json). Returns the :class:`ClassifierCard`.

    ``stop_after_epochs=K`` ends this run after K more epochs, leaving only the training state (a
    time-sliced run; continue with ``resume=True``); it then returns None.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .classifier import ClassifierCard, file_sha256, library_versions, load_classifier
    from .data.sources import open_source
    from .preprocess import Preprocessor

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError("--out must end in .safetensors")
    if augment not in ("affine", "none"):
        raise ValueError("augment must be 'affine' or 'none'")
    if optimizer not in ("adamw", "sgd"):
        raise ValueError("optimizer must be 'adamw' or 'sgd'")
    out.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    model_kwargs = dict(model_kwargs or {})
    t_start = time.perf_counter()
    cpu_start = time.process_time()

    train_src = open_source(data, "train", seed=split_seed)
    test_src = open_source(data, "test", seed=split_seed)
    class_names = list(train_src.class_names)
    num_classes = len(class_names)

    # 1) decode + resize once through the eval transform with identity normalisation, measure mean/std
    base_cfg = {"input_size": (3, img_size, img_size), "interpolation": "bilinear", "mean": (0.0,) * 3,
                "std": (1.0,) * 3, "crop_pct": 1.0, "crop_mode": "center"}
    x_train01, y_train = _preprocess_all(train_src, Preprocessor(base_cfg))
    mean = x_train01.mean(dim=(0, 2, 3))
    std = x_train01.std(dim=(0, 2, 3)).clamp_min(1e-3)
    mean_l = [round(float(v), 4) for v in mean]
    std_l = [round(float(v), 4) for v in std]
    data_cfg = dict(base_cfg, mean=tuple(mean_l), std=tuple(std_l))
    pre = Preprocessor(data_cfg)
    m_t = torch.tensor(mean_l).view(1, -1, 1, 1)
    s_t = torch.tensor(std_l).view(1, -1, 1, 1)
    x_train = (x_train01 - m_t) / s_t
    del x_train01
    x_test, y_test = _preprocess_all(test_src, pre)
    fill = (-m_t / s_t).view(-1)  # a black pixel after normalisation

    # 2) model + optimizer
    torch.manual_seed(seed)
    model, model_kwargs = _make_model(model_name, num_classes, model_kwargs, img_size)
    model.to(device)
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))
    else:
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    warmup_steps = int(round(warmup_epochs * steps_per_epoch))

    settings = {"data": str(data), "model": model_name, "model_kwargs": model_kwargs, "epochs": epochs,
                "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "optimizer": optimizer,
                "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing, "seed": seed,
                "split_seed": split_seed, "img_size": img_size, "augment": augment}
    state_file = train_state_path(out)
    start_epoch, elapsed_before = 0, 0.0
    if resume and state_file.is_file():
        st = torch.load(state_file, map_location="cpu", weights_only=False)
        def but_epochs(d: dict) -> dict:
            return {k: v for k, v in d.items() if k != "epochs"}

        same = but_epochs(st["settings"]) == but_epochs(settings)
        if not same:
            raise ValueError(f"{state_file} was written with different settings: {st['settings']}")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        start_epoch = int(st["epoch"])
        elapsed_before = float(st.get("train_time_s", 0.0))
        _log(f"resuming from {state_file} after epoch {start_epoch}", quiet)
    elif resume:
        _log(f"--resume: no training state at {state_file}, starting from scratch", quiet)

    # 3) train
    t_train = time.perf_counter()
    bar = tqdm(total=total_steps, initial=start_epoch * steps_per_epoch, desc=f"train {model_name}",
               unit="step", disable=not progress or quiet, dynamic_ncols=True)
    step = start_epoch * steps_per_epoch
    end_epoch = epochs if stop_after_epochs is None else min(epochs, start_epoch + int(stop_after_epochs))
    for epoch in range(start_epoch, end_epoch):
        model.train()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, n_seen = 0.0, 0
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            xb, yb = x_train[idx], y_train[idx]
            if augment == "affine":
                xb = _augment(xb, gen, fill)
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total_steps, warmup_steps, lr)
            logits = model(xb.to(device))
            loss = F.cross_entropy(logits, yb.to(device), label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            n_seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / n_seen:.3f}")
        elapsed = elapsed_before + time.perf_counter() - t_train
        with atomic_path(state_file) as tmp:
            torch.save({"settings": settings, "epoch": epoch + 1, "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "train_time_s": elapsed}, tmp)
        if not bar.disable:
            bar.write(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / n_seen:.4f}")
    bar.close()
    train_time = elapsed_before + time.perf_counter() - t_train
    if end_epoch < epochs:
        _log(f"stopped after epoch {end_epoch}/{epochs}; training state in {state_file} (continue with --resume)",
             quiet)
        return None

    # 4) write weights + card, then measure the card's accuracy through the deployed loading path
    model.eval()
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt", "model": model_name})
        os.chmod(tmp, 0o644)
    in_memory_acc = accuracy(model, x_test, y_test, device)
    card = ClassifierCard(
        model_name=model_name, model_kwargs=model_kwargs, num_classes=num_classes, class_names=class_names,
        input_size=[3, img_size, img_size], mean=mean_l, std=std_l, interpolation="bilinear", crop_pct=1.0,
        crop_mode="center", dataset=_dataset_info(train_src),
        split={"train": len(train_src), "test": len(test_src), "split_seed": split_seed,
               "rule": train_src.describe().get("split_rule", "train/ and test/ folders")},
        seed=seed, clean_test_accuracy=None,
        training=dict(settings, schedule="linear warmup + cosine", train_time_s=round(train_time, 1),
                      device=str(device), torch_threads=torch.get_num_threads(),
                      augmentation=("random affine: rotation +-10 deg, scale 0.9-1.1, shift +-2 px"
                                    if augment == "affine" else "none"),
                      resumed=start_epoch > 0),
        versions=library_versions(), created=ClassifierCard.now(), weights_sha256=file_sha256(out))
    card.save(out.with_suffix(".json"))
    clf = load_classifier(out, device=device)
    acc = evaluate_classifier(clf, test_src)
    if abs(acc - in_memory_acc) > 0.05:
        raise RuntimeError(f"accuracy after reload {acc:.2f} differs from in-memory {in_memory_acc:.2f}")
    card.clean_test_accuracy = round(acc, 2)
    card.training["total_time_s"] = round(time.perf_counter() - t_start, 1)
    card.training["process_cpu_time_s"] = round(time.process_time() - cpu_start, 1)
    card.save(out.with_suffix(".json"))
    if not keep_train_state and state_file.exists():
        state_file.unlink()
    _log(f"{model_name}: clean test accuracy {acc:.2f}% ({len(test_src)} images), trained in {train_time:.1f}s; "
         f"wrote {out} and {out.with_suffix('.json')}", quiet)
    return card


def _dataset_info(src) -> dict:
    d = src.describe()
    keep = ("name", "description", "origin", "licence", "subset_from", "kind", "root")
    return {k: d[k] for k in keep if k in d}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train-source", help="train a small timm source classifier (CKPT .safetensors + card)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist5k", help="'mnist5k' or a folder DIR/<class>/<image> "
                   "(or DIR/train/<class>/... and DIR/test/<class>/...)")
    p.add_argument("--model", default="test_resnet", help="timm model name (e.g. test_resnet, test_vit)")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors); the card goes beside it (.json)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=DEFAULTS["optimizer"])
    p.add_argument("--warmup-epochs", type=float, default=DEFAULTS["warmup_epochs"])
    p.add_argument("--label-smoothing", type=float, default=DEFAULTS["label_smoothing"])
    p.add_argument("--augment", choices=("affine", "none"), default=DEFAULTS["augment"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--split-seed", type=int, default=DEFAULTS["split_seed"],
                   help="seed of the train/test split of a plain folder (MNIST-5k has a fixed split)")
    p.add_argument("--img-size", type=int, default=DEFAULTS["img_size"])
    p.add_argument("--model-kwargs", type=json.loads, default={}, help='JSON, e.g. \'{"patch_size": 4}\'')
    p.add_argument("--resume", action="store_true", help="continue from the per-epoch training state if present")
    p.add_argument("--stop-after-epochs", type=int, default=None,
                   help="run at most this many epochs now and keep the training state (continue with --resume)")
    p.add_argument("--keep-train-state", action="store_true", help="keep the .train-state.pt file at the end")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_argument(p, default=2, help="torch CPU threads (default 2, as the bundled models were trained): CPU "
                         "training is bit-reproducible only at the same thread count, which the card records")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    train_source(data=args.data, model_name=args.model, out=args.out, epochs=args.epochs, batch_size=args.batch_size,
                 lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
                 warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing, seed=args.seed,
                 split_seed=args.split_seed, img_size=args.img_size, model_kwargs=args.model_kwargs,
                 augment=args.augment, resume=args.resume, device=args.device,
                 keep_train_state=args.keep_train_state, quiet=args.quiet,
                 stop_after_epochs=args.stop_after_epochs)
    return 0
