"""Classifier cards, loading through timm's pretrained path, the Preprocessor, and train-source."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from mgg_core.classifier import ClassifierCard, default_checkpoint, load_classifier
from mgg_core.data.sources import mnist5k
from mgg_core.preprocess import Preprocessor
from mgg_core.train_source import evaluate_classifier

KINDS = ["resnet", "vit"]


@pytest.fixture(scope="module")
def test_src():
    return mnist5k("test")


@pytest.fixture(scope="module", params=KINDS)
def bundled(request):
    return request.param, load_classifier(default_checkpoint(request.param), device="cpu")


# ----------------------------------------------------------------------------------------------- card

def _card(**kw):
    base = dict(model_name="test_resnet", num_classes=2, class_names=["a", "b"], input_size=[3, 32, 32],
                mean=[0.1, 0.2, 0.3], std=[0.5, 0.5, 0.5], model_kwargs={"x": 1}, seed=3, clean_test_accuracy=91.5,
                dataset={"name": "d", "licence": "CC0"}, split={"test": 10}, training={"epochs": 2},
                versions={"torch": torch.__version__}, created=ClassifierCard.now())
    base.update(kw)
    return ClassifierCard(**base)


def test_card_json_round_trip(tmp_path):
    card = _card()
    assert ClassifierCard.from_json(card.to_json()) == card
    card.save(tmp_path / "c.json")
    assert ClassifierCard.load(tmp_path / "c.json") == card
    d = json.loads(card.to_json())
    assert d["input_size"] == [3, 32, 32] and d["model_kwargs"] == {"x": 1}
    assert card.data_config()["mean"] == (0.1, 0.2, 0.3)
    with pytest.raises(ValueError):
        ClassifierCard.from_dict(dict(d, surprise=1))
    with pytest.raises(ValueError):
        _card(class_names=["a"])
    with pytest.raises(ValueError):
        _card(mean=[0.1])


@pytest.mark.parametrize("kind", KINDS)
def test_bundled_cards_describe_the_checkpoints(kind):
    path = default_checkpoint(kind)
    assert path.is_file() and path.stat().st_size < 5 * 2**20
    card = ClassifierCard.load(path.with_suffix(".json"))
    assert card.model_name == {"resnet": "test_resnet", "vit": "test_vit"}[kind]
    assert card.num_classes == 10 and card.class_names == [str(i) for i in range(10)]
    assert card.input_size == [3, 32, 32]
    assert "CC BY-SA 3.0" in card.dataset["licence"]
    assert card.split["train"] == 4000 and card.split["test"] == 1000
    assert set(card.versions) >= {"torch", "timm"} and card.created
    from mgg_core.classifier import file_sha256
    assert card.weights_sha256 == file_sha256(path)
    floor = {"resnet": 95.0, "vit": 88.0}[kind]
    assert card.clean_test_accuracy >= floor
    with pytest.raises(ValueError):
        default_checkpoint("mlp")


# ----------------------------------------------------------------------------------------------- loading

def test_load_classifier_goes_through_timm_and_matches_card(bundled, test_src):
    kind, clf = bundled
    card = clf.card
    assert clf.checkpoint_path == default_checkpoint(kind)
    # timm's pretrained path loaded our file, with the card's data config overlaid
    assert clf.model.pretrained_cfg["file"] == str(default_checkpoint(kind).resolve())
    assert clf.model.pretrained_cfg["num_classes"] == 10
    assert tuple(clf.data_config["input_size"]) == tuple(card.input_size)
    assert tuple(clf.data_config["mean"]) == tuple(card.mean) and tuple(clf.data_config["std"]) == tuple(card.std)
    assert clf.preprocessor.mean == tuple(card.mean) and clf.preprocessor.std == tuple(card.std)
    assert not clf.model.training
    assert not any(p.requires_grad for p in clf.model.parameters())
    assert clf.num_classes == 10 and clf.class_names == card.class_names
    norm_types = {type(m).__name__ for m in clf.model.modules()}
    assert ("BatchNorm2d" in norm_types) if kind == "resnet" else ("LayerNorm" in norm_types)
    acc = evaluate_classifier(clf, test_src)
    assert abs(acc - card.clean_test_accuracy) <= 0.5


def test_loaded_weights_equal_the_file(bundled):
    from safetensors.torch import load_file

    kind, clf = bundled
    sd = load_file(str(default_checkpoint(kind)))
    model_sd = clf.model.state_dict()
    assert set(sd) == set(model_sd)
    assert all(torch.equal(sd[k], model_sd[k]) for k in sd)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "none.safetensors")
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(default_checkpoint("resnet").read_bytes())
    with pytest.raises(FileNotFoundError, match="card"):
        load_classifier(lone)
    with pytest.raises(ValueError):
        load_classifier(tmp_path / "x.pt")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_load_on_cuda(test_src):
    clf = load_classifier(default_checkpoint("resnet"), device="cuda")
    assert next(clf.model.parameters()).is_cuda
    assert abs(evaluate_classifier(clf, test_src) - clf.card.clean_test_accuracy) <= 0.5


# ----------------------------------------------------------------------------------------------- preprocessor

@pytest.fixture(scope="module")
def pre():
    card = ClassifierCard.load(default_checkpoint("resnet").with_suffix(".json"))
    return Preprocessor(card.data_config()), card


def test_preprocessor_numpy_and_pil_identical(pre, test_src):
    p, _ = pre
    gray = test_src.images[:50]  # (N, 28, 28) uint8
    x_np = p(gray)
    x_pil = p([Image.fromarray(a) for a in gray])
    assert x_np.shape == (50, 3, 32, 32) and x_np.dtype == torch.float32
    assert torch.equal(x_np, x_pil)
    assert torch.equal(p(gray[..., None]), x_np)  # (N,H,W,1)
    assert torch.equal(p(np.repeat(gray[..., None], 3, axis=-1)), x_np)  # gray replicated to RGB
    rgb = np.random.default_rng(0).integers(0, 255, (8, 37, 29, 3), dtype=np.uint8)
    assert torch.equal(p(rgb), p([Image.fromarray(a) for a in rgb]))
    # identical to timm's own transform applied image by image
    ref = torch.stack([p.transform(Image.fromarray(a).convert("RGB")) for a in gray])
    assert torch.equal(ref, x_np)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("channels", [3, 1])
def test_preprocessor_lean_stages_equal_timms_transform(pre, interpolation, crop_pct, channels):
    """The lean PIL stages (one Pillow resize, crop as a slice, grayscale replicated after normalising) give
    timm's transform image by image, bit for bit: gray, RGB, RGBA and palette images, square and not, larger,
    equal to and smaller than the model's input (padding), in one batch and alone."""
    from mgg_core.preprocess import to_channels

    p0, _ = pre
    mean, std = (0.2, 0.4, 0.6)[:channels], (0.3, 0.2, 0.25)[:channels]
    p = Preprocessor(dict(p0.data_config, input_size=(channels, 32, 32), interpolation=interpolation,
                          crop_pct=crop_pct, mean=mean, std=std))
    assert p._lean is not None  # timm's center-crop transform takes the lean stages
    rng = np.random.default_rng(0)
    shapes = [(28, 28), (32, 32), (37, 37), (40, 29), (29, 57), (20, 20), (31, 64), (100, 75), (32, 20), (20, 32)]
    images = []
    for i, (h, w) in enumerate(shapes):
        images.append(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        if i % 3 == 0:
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)))
            images.append(images[-2].convert("P"))
    ref = torch.stack([p.transform(to_channels(im, channels)) for im in images])
    assert torch.equal(p(images), ref)
    for im, r in zip(images, ref, strict=True):
        assert torch.equal(p([im])[0], r)
    for (h, w) in shapes:  # arrays: gray (N,H,W) and (N,H,W,1), RGB
        gray = rng.integers(0, 256, (3, h, w), dtype=np.uint8)
        want = torch.stack([p.transform(to_channels(Image.fromarray(a), channels)) for a in gray])
        assert torch.equal(p(gray), want) and torch.equal(p(gray[..., None]), want)
        rgb = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        want = torch.stack([p.transform(to_channels(Image.fromarray(a), channels)) for a in rgb])
        assert torch.equal(p(rgb), want)


@pytest.mark.parametrize("interpolation", ["nearest", "lanczos", "box"])
@pytest.mark.parametrize(("crop_mode", "size"), [("squash", (32, 24)), ("center", (24, 32)), ("center", (32, 32))])
@pytest.mark.parametrize("channels", [3, 1])
def test_preprocessor_lean_stages_equal_timms_transform_for_every_mode(pre, interpolation, crop_mode, size, channels):
    """The lean stages against timm's transform for the other input modes the old path accepted (palette with
    transparency, LA, bilevel, CMYK, YCbCr, 16-bit, 32-bit int and float grayscale, grayscale with a transparency
    key, a lazily decoded JPEG), the other Pillow filters, timm's squash mode (``Resize`` with an (h, w) size: lean
    too) and a non-square center crop (timm's ``ResizeKeepRatio``: timm's own stages), down to 1-pixel images."""
    import io

    from mgg_core.preprocess import to_channels

    p0, _ = pre
    p = Preprocessor(dict(p0.data_config, input_size=(channels, *size), interpolation=interpolation, crop_pct=0.875,
                          crop_mode=crop_mode, mean=(0.5, 0.4, 0.3)[:channels], std=(0.2, 0.3, 0.25)[:channels]))
    assert (p._lean is not None) == (size[0] == size[1] or crop_mode == "squash")
    rng = np.random.default_rng(1)
    images: list[Image.Image] = []
    for h, w in [(1, 1), (1, 40), (3, 200), (33, 31), (40, 29), (20, 20)]:
        gray, rgb = rng.integers(0, 256, (h, w), dtype=np.uint8), rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pal = Image.fromarray(rgb).convert("P")
        pal.info["transparency"] = 3
        keyed = Image.fromarray(gray)
        keyed.info["transparency"] = 7
        jpeg = io.BytesIO()
        Image.fromarray(gray).save(jpeg, "JPEG")
        jpeg.seek(0)
        images += [pal, keyed, Image.fromarray(gray).convert("LA"), Image.fromarray(gray).convert("1"),
                   Image.fromarray(rgb).convert("CMYK"), Image.fromarray(rgb).convert("YCbCr"),
                   Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.uint16)),
                   Image.fromarray(gray).convert("I"), Image.fromarray(gray).convert("F"), Image.open(jpeg)]
    ref = torch.stack([p.transform(to_channels(im, channels)) for im in images])
    assert torch.equal(p(images), ref)
    for im, r in zip(images, ref, strict=True):
        assert torch.equal(p([im])[0], r)


def test_preprocessor_uses_card_mean_std(pre):
    p, card = pre
    assert list(p.mean) == card.mean and list(p.std) == card.std
    v = 200
    x = p(np.full((2, 32, 32, 3), v, np.uint8))
    expected = torch.tensor([(v / 255 - m) / s for m, s in zip(card.mean, card.std, strict=True)])
    assert torch.allclose(x[0, :, 5, 5], expected, atol=1e-6)


def test_preprocessor_channel_conversion_and_errors(pre):
    p, _ = pre
    rgba = np.zeros((1, 32, 32, 4), np.uint8)
    rgba[..., :3] = 255  # white but fully transparent -> black
    black = p(np.zeros((1, 32, 32, 3), np.uint8))
    assert torch.equal(p(rgba), black)
    assert torch.equal(p([Image.new("P", (32, 32))]), black)
    one = Preprocessor(dict(p.data_config, input_size=(1, 32, 32), mean=(0.5,), std=(0.5,)))
    assert one(np.zeros((2, 20, 20, 3), np.uint8)).shape == (2, 1, 32, 32)
    with pytest.raises(ValueError):
        p(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError):
        p(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError):
        p([])


# ----------------------------------------------------------------------------------------------- train-source

def _retrain(kind, tmp_path, tolerance: float = 1.0):
    from mgg_core.cli import main

    card = ClassifierCard.load(default_checkpoint(kind).with_suffix(".json"))
    t = card.training
    out = tmp_path / f"{kind}.safetensors"
    argv = ["train-source", "--data", "mnist5k", "--model", card.model_name, "--out", str(out),
            "--epochs", str(t["epochs"]), "--batch-size", str(t["batch_size"]), "--lr", str(t["lr"]),
            "--weight-decay", str(t["weight_decay"]), "--optimizer", t["optimizer"],
            "--warmup-epochs", str(t["warmup_epochs"]), "--augment", t["augment"], "--seed", str(card.seed),
            "--img-size", str(card.input_size[1]), "--model-kwargs", json.dumps(card.model_kwargs),
            "--device", "cpu", "--threads", str(t["torch_threads"]), "--quiet"]
    assert main(argv) == 0
    new = ClassifierCard.load(out.with_suffix(".json"))
    assert new.mean == card.mean and new.std == card.std and new.model_kwargs == card.model_kwargs
    assert abs(new.clean_test_accuracy - card.clean_test_accuracy) <= tolerance
    return new


def test_train_source_reproduces_resnet(tmp_path):
    new = _retrain("resnet", tmp_path)
    assert new.clean_test_accuracy >= 95.0


@pytest.mark.slow  # ~100 s on 2 cores; runs in CI (deselect locally with -m "not slow")
def test_train_source_reproduces_vit(tmp_path):
    # Measured 2026-11-30 on an AVX-512 (BF16/FP16) Xeon: the code before this round (c3e7d8e) and after it both
    # retrain the ViT to 93.0% against the card's 94.1% (made on another machine), deterministically; the ResNet
    # still lands within 1 point. CPU float kernels differ across microarchitectures and 30 epochs of AdamW on the
    # ViT amplify them, so bit-reproduction holds only on the same CPU kind and thread count (docs/data.md).
    new = _retrain("vit", tmp_path, tolerance=1.5)
    assert new.clean_test_accuracy >= 88.0


def test_train_source_on_a_folder_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from mgg_core.train_source import train_source, train_state_path

    src = mnist5k("train")
    root = tmp_path / "digits"
    for c in ("3", "7", "8"):
        (root / c).mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(src.labels == int(c))[:12]):
            Image.fromarray(src.images[i]).save(root / c / f"{k}.png")
    kw = dict(data=str(root), model_name="test_resnet", batch_size=8, lr=3e-3, seed=1, quiet=True, progress=False)
    full = tmp_path / "full.safetensors"
    card_full = train_source(out=full, epochs=3, **kw)
    assert card_full.class_names == ["3", "7", "8"] and card_full.num_classes == 3
    assert card_full.split["train"] + card_full.split["test"] == 36
    assert not train_state_path(full).exists()  # training state removed at the end
    part = tmp_path / "part.safetensors"
    assert train_source(out=part, epochs=3, stop_after_epochs=2, **kw) is None  # "interrupted" after epoch 2
    assert train_state_path(part).exists() and not part.exists()
    card_res = train_source(out=part, epochs=3, resume=True, **kw)
    assert card_res.training["resumed"] is True
    a, b = load_file(str(full)), load_file(str(part))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert card_res.clean_test_accuracy == card_full.clean_test_accuracy


def test_train_source_config_validates_and_builds_its_flags():
    from mgg_core.cli import build_parser, config_kwargs
    from mgg_core.train_source import TrainSourceConfig

    for bad in (dict(out="m.pt"), dict(augment="mixup"), dict(optimizer="adam"), dict(epochs=0),
                dict(batch_size=0), dict(img_size=0), dict(stop_after_epochs=-1)):
        with pytest.raises(ValueError):
            TrainSourceConfig(**bad)
    args = build_parser("train-source").parse_args(
        ["train-source", "--out", "m.safetensors", "--model", "test_vit", "--model-kwargs", '{"patch_size": 8}',
         "--optimizer", "sgd", "--epochs", "3", "--stop-after-epochs", "1", "--resume"])
    cfg = TrainSourceConfig(**config_kwargs(TrainSourceConfig, args))
    assert (cfg.model_name, cfg.model_kwargs, cfg.optimizer, cfg.epochs, cfg.stop_after_epochs, cfg.resume) == (
        "test_vit", {"patch_size": 8}, "sgd", 3, 1, True)
    d = cfg.to_dict()
    assert d["out"] == "m.safetensors" and d["lr"] == TrainSourceConfig.lr and d["augment"] == "affine"
    assert json.loads(json.dumps(d)) == d
    assert cfg.settings({"patch_size": 8, "img_size": 32})["model"] == "test_vit"
