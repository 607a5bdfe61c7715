"""The 19 ImageNet-C corruptions (15 test + 4 held-out), deterministic per (seed, corruption, severity, index).

Backed by the ``imagecorruptions`` package (the maintained ``imagecorruptions-imaug`` fork). That library
draws from numpy's *global* RNG (and, for impulse_noise / glass_blur, from a fresh unseeded generator
unless given a seed), so :func:`corrupt_image` derives one seed from (seed, corruption, severity, index),
seeds numpy's global RNG and python's ``random`` with it for the duration of the call, passes it as the
explicit seed where the library accepts one, and restores both global states afterwards. A module lock
makes this safe from several threads.

The library requires images of at least 32x32 pixels. :func:`prepare_image` converts any input to RGB
and upscales it (bilinear, the same PIL resize timm's eval transform uses) so that its shorter side is at
least 32; MNIST's 28x28 digits become 32x32 RGB.

Two parameter profiles (``profile=``): ``"imagenet-c"`` (the default; the ``imagecorruptions`` library, ImageNet-C's
constants, made for 224 px photos) and ``"cifar-c"`` (``cifar_c.py``: the same corruption family with the constants
of CIFAR-10-C's ``make_cifar_c.py``, the field's convention for 32 px images). The cifar-c functions draw only from
a ``numpy.random.Generator`` seeded with the same per-(seed, corruption, severity, index) seed.
"""
from __future__ import annotations

import contextlib
import random
import threading
import zlib

import numpy as np
from PIL import Image

TEST_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
HELDOUT_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "spatter", "gaussian_blur", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = TEST_CORRUPTIONS + HELDOUT_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIZE = 32
PROFILES: tuple[str, ...] = ("imagenet-c", "cifar-c")
DEFAULT_PROFILE = "imagenet-c"

_SEEDED_BY_ARGUMENT = {"impulse_noise", "glass_blur"}
_RNG_LOCK = threading.RLock()


def check_corruption(name: str, severity: int) -> None:
    if name not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(ALL_CORRUPTIONS)}")
    if int(severity) != severity or int(severity) not in SEVERITIES:
        raise ValueError(f"severity must be an integer in 1..5, got {severity!r}")


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown corruption profile {profile!r}; choose from {', '.join(PROFILES)}")
    return profile


def corruption_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A 32-bit seed that depends on all four arguments (stable across runs, platforms and versions)."""
    key = [int(seed) & 0xFFFFFFFF, zlib.crc32(corruption.encode("utf-8")), int(severity), int(index) & 0xFFFFFFFF,
           int(index) >> 32]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def seeded_global_rngs(seed: int):
    """Seed numpy's legacy global RNG and python's ``random`` for the block, then restore both."""
    with _RNG_LOCK:
        np_state = np.random.get_state()
        py_state = random.getstate()
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def prepare_image(image: np.ndarray | Image.Image, min_size: int = MIN_SIZE) -> np.ndarray:
    """RGB uint8 (H, W, 3) with the shorter side >= ``min_size`` (bilinear upscaling, aspect kept)."""
    if isinstance(image, Image.Image):
        from .sources import pil_to_uint8

        arr = pil_to_uint8(image)
    else:
        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        pil = Image.fromarray(arr).convert("RGB")
    elif arr.ndim == 3 and arr.shape[2] == 3:
        pil = Image.fromarray(arr)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        from .sources import pil_to_uint8

        pil = Image.fromarray(pil_to_uint8(Image.fromarray(np.ascontiguousarray(arr))))
    else:
        raise ValueError(f"expected an image (H,W), (H,W,1), (H,W,3) or (H,W,4), got shape {arr.shape}")
    w, h = pil.size
    short = min(w, h)
    if short < min_size:
        scale = min_size / short
        new_w = max(min_size, int(round(w * scale)))
        new_h = max(min_size, int(round(h * scale)))
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return np.asarray(pil, dtype=np.uint8).copy()


def corrupt_image(image: np.ndarray | Image.Image, corruption: str, severity: int, seed: int = 0,
                  index: int = 0, profile: str = DEFAULT_PROFILE) -> np.ndarray:
    """Corrupt one image; returns uint8 (H, W, 3) with H, W >= 32.

    Args:
        image: uint8 image or PIL image (any size; upscaled to a shorter side of 32 first).
        corruption, severity: one of ``ALL_CORRUPTIONS``, 1..5.
        seed, index: with (corruption, severity) they fix every random draw.
        profile: ``"imagenet-c"`` (ImageNet-C constants) or ``"cifar-c"`` (CIFAR-10-C constants).

    The result depends only on (image, corruption, severity, seed, index, profile): the same arguments give the
    same pixels in any process, and the caller's global RNG states are left untouched.
    """
    check_corruption(corruption, severity)
    x = prepare_image(image)
    s = corruption_seed(seed, corruption, severity, index)
    return _CORRUPTERS[check_profile(profile)](x, corruption, int(severity), s)


def _corrupt_imagenet_c(x: np.ndarray, corruption: str, severity: int, s: int) -> np.ndarray:
    from imagecorruptions import corrupt

    kwargs = {"seed": s} if corruption in _SEEDED_BY_ARGUMENT else {}
    with seeded_global_rngs(s):
        out = corrupt(x, severity=severity, corruption_name=corruption, **kwargs)
    out = np.asarray(out)
    if out.dtype != np.uint8:
        out = np.clip(out, 0, 255).astype(np.uint8)
    if out.shape != x.shape:  # the library keeps the shape; guard against surprises in other versions
        out = np.asarray(Image.fromarray(out).resize((x.shape[1], x.shape[0]), Image.Resampling.BILINEAR))
    return out


def _corrupt_cifar_c(x: np.ndarray, corruption: str, severity: int, s: int) -> np.ndarray:
    from .cifar_c import corrupt_cifar

    return corrupt_cifar(x, corruption, severity, s)


#: profile name -> corrupter(prepared image, corruption, severity, derived seed)
_CORRUPTERS = {"imagenet-c": _corrupt_imagenet_c, "cifar-c": _corrupt_cifar_c}


def profile_version(profile: str = DEFAULT_PROFILE) -> str:
    """What produced the pixels of ``profile`` (recorded in manifests and protocols)."""
    if check_profile(profile) == "cifar-c":
        return "mgg_core.data.cifar_c (CIFAR-10-C constants of make_cifar_c.py)"
    return imagecorruptions_version()


def imagecorruptions_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("imagecorruptions-imaug", "imagecorruptions"):
        try:
            return f"{dist}=={version(dist)}"
        except PackageNotFoundError:
            continue
    return "unknown"
