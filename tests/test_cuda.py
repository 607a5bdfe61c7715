"""The engine and the service on an accelerator, checked against the CPU (marker ``cuda``; skipped without one).

The device under test is ``MGG_TEST_DEVICE`` (default ``cuda``); the reference is always ``cpu``. With
``MGG_TEST_DEVICE=cpu`` the same tests run CPU against CPU, which exercises them on machines without a GPU
(``scripts/gpu_check.py --device cpu`` does that). Comparisons run in strict fp32 (TF32 off for convolutions and
matrix products), so the tolerances are those of fp32 kernels that sum in a different order, not of TF32.

    HF_HUB_OFFLINE=1 python -m pytest -m cuda tests/test_cuda.py
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LiveServer, npy_bytes

from service.runtime import Runtime, load_runtime
from service.settings import ServiceSettings

DEVICE = os.environ.get("MGG_TEST_DEVICE", "cuda")
_AVAILABLE = not DEVICE.startswith("cuda") or torch.cuda.is_available()

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not _AVAILABLE, reason=f"no CUDA device ({DEVICE} unavailable)")]

#: (method, optimizer): every optimizer, and the service's default method with its default optimizer (None)
CONFIGS = [("tent", "sgd"), ("tent", "adam"), ("foa", "mgg"), ("tent", "mgg"), ("eata", None)]
MODELS = ["resnet", "vit"]
ATOL, RTOL = 2e-4, 2e-3     # fp32 on two devices, a few steps apart
#: MGG's memories amplify last-bit differences: a near-zero gradient normalised by its near-zero second moment is
#: noise. Measured on CPU (3 steps, bundled resnet, foa+mgg): inputs perturbed by 1e-6 (relative) moved
#: opt.memory_W by 1.6e-3 of its largest entry while theta moved by 5e-6 and the logits by 8e-6; and two runs of
#: the same steps with 2 threads differed by 1.7e-5 in opt.memory_W. These tensors are compared relative to their
#: largest entry instead of entry by entry.
AMPLIFIED = ("opt.memory_",)
AMPLIFIED_REL = {"device": 2e-2, "same_device": 1e-3}


@pytest.fixture(autouse=True)
def strict_fp32() -> Iterator[None]:
    """TF32 off while a test runs (cuDNN convolutions use it by default on Ampere and later)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _settings(device: str, **kw) -> ServiceSettings:
    # one update per batch: every step moves the stream, so a device difference would show
    base = dict(device=device, update_images=1, log_level="warning")
    return ServiceSettings(_env_file=None, **{**base, **kw})


def _runtime(device: str, model: str, method: str, optimizer: str | None) -> Runtime:
    return load_runtime(_settings(device, model=model, method=method, optimizer=optimizer))


def _batches(rt: Runtime, digit_images: np.ndarray, sizes: list[int]) -> list[torch.Tensor]:
    """Real digits through the model's own preprocessing, split into batches of ``sizes``."""
    x = rt.preprocessor(digit_images[: sum(sizes)])
    return list(torch.split(x, sizes))


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), atol=ATOL, rtol=RTOL, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _same_labels(a: torch.Tensor, b: torch.Tensor) -> None:
    """Identical predicted labels wherever the reference's top-2 margin is above fp32 noise."""
    top2 = a.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(a.argmax(1)[clear], b.argmax(1)[clear])


def _assert_states_close(a, b, atol: float = ATOL, rtol: float = RTOL, amplified: float = AMPLIFIED_REL["device"]):
    """Same keys and counters; every tensor close entry by entry, MGG's memories relative to their largest entry."""
    assert a.tensors.keys() == b.tensors.keys()
    assert (a.step, a.batches, a.images, a.skipped) == (b.step, b.batches, b.images, b.skipped)
    for k in a.tensors:
        x, y = a.tensors[k].detach().cpu().float(), b.tensors[k].detach().cpu().float()
        if k.startswith(AMPLIFIED):
            scale = float(y.abs().max())
            assert float((x - y).abs().max()) <= amplified * scale, f"{k}: differs by more than {amplified} x {scale}"
        else:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("method,optimizer", CONFIGS)
@pytest.mark.parametrize("model", MODELS)
def test_step_on_device_equals_cpu(model, method, optimizer, digit_images):
    ref, dev = _runtime("cpu", model, method, optimizer), _runtime(DEVICE, model, method, optimizer)
    assert dev.engine.device.type == torch.device(DEVICE).type
    s_ref, s_dev = ref.engine.new_state(), dev.engine.new_state()
    for x in _batches(ref, digit_images, [16, 8, 8]):
        r_ref, r_dev = ref.engine.step(s_ref, x), dev.engine.step(s_dev, x)
        assert (r_ref.adapted, r_ref.skipped_reason, r_ref.rolled_back) == (
            r_dev.adapted, r_dev.skipped_reason, r_dev.rolled_back)
        _close(r_ref.logits, r_dev.logits, "logits")
        _same_labels(r_ref.logits, r_dev.logits)
    assert s_ref.step > 0 or method == "eata"   # EATA may filter every image of a confident model
    assert s_dev.theta.device.type == torch.device(DEVICE).type
    _assert_states_close(s_ref, s_dev)


@pytest.mark.parametrize("src,dst", [(DEVICE, "cpu"), ("cpu", DEVICE)])
def test_state_saved_on_one_device_loads_on_the_other(src, dst, tmp_path: Path, digit_images):
    a, b = _runtime(src, "resnet", "foa", "mgg"), _runtime(dst, "resnet", "foa", "mgg")
    xs = _batches(a, digit_images, [16, 8])
    state = a.engine.new_state()
    a.engine.step(state, xs[0])
    state.save(tmp_path / "s.safetensors")
    moved = b.engine.load_state(tmp_path / "s.safetensors")
    assert {t.device.type for t in moved.tensors.values()} == {torch.device(dst).type}
    _assert_states_close(state, moved)
    # and the stream goes on the same on either side
    r_a, r_b = a.engine.step(state, xs[1]), b.engine.step(moved, xs[1])
    _close(r_a.logits, r_b.logits, "logits after reload")
    _assert_states_close(state, moved)


@pytest.mark.parametrize("method,optimizer", [("tent", "adam"), ("foa", "mgg"), ("eata", None)])
@pytest.mark.parametrize("model", MODELS)
def test_step_many_equals_separate_steps_on_device(model, method, optimizer, digit_images):
    rt = _runtime(DEVICE, model, method, optimizer)
    sizes = [4, 1, 8, 2, 4, 3, 5, 4]   # 8 streams, mixed request sizes
    fused = [rt.engine.new_state(seed=i) for i in range(len(sizes))]
    alone = [s.clone() for s in fused]
    for rnd in range(2):
        xs = _batches(rt, np.roll(digit_images, 7 * rnd, axis=0), sizes)
        many = rt.engine.step_many(list(zip(fused, xs, strict=True)))
        single = [rt.engine.step(s, x) for s, x in zip(alone, xs, strict=True)]
        for m, s in zip(many, single, strict=True):
            torch.testing.assert_close(m.logits, s.logits, atol=1e-5, rtol=1e-5)
            assert torch.equal(m.logits.argmax(1), s.logits.argmax(1))
            assert (m.adapted, m.skipped_reason, m.step) == (s.adapted, s.skipped_reason, s.step)
    for f, a in zip(fused, alone, strict=True):
        _assert_states_close(f, a, atol=1e-5, rtol=1e-5, amplified=AMPLIFIED_REL["same_device"])


def test_service_on_device_answers_predict(tmp_path: Path, digit_images):
    settings = _settings(DEVICE, model="resnet", snapshot_dir=tmp_path / "snap", update_images=64)
    srv = LiveServer(settings)
    try:
        with srv.client() as c:
            info = c.get("/info").json()
            assert str(info["model"]["device"]).startswith(torch.device(DEVICE).type)
            for _ in range(2):
                r = c.post("/predict", content=npy_bytes(digit_images[:8]),
                           headers={"Content-Type": "application/x-npy", "X-Stream-Id": "gpu-check"})
                assert r.status_code == 200, r.text
                assert len(r.json()["predictions"]) == 8
    finally:
        srv.stop()
