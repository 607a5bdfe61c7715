"""Images -> normalised float tensor (N, C, H, W), through the model's own timm eval transform.

``Preprocessor(data_config)`` takes timm's resolved data config (``input_size``, ``interpolation``,
``mean``, ``std``, ``crop_pct``, ``crop_mode``) and builds ``timm.data.create_transform(**cfg,
is_training=False)``. Inputs are a list of PIL images or a uint8 numpy array (N, H, W, C) / (N, H, W);
numpy arrays are turned into PIL images first, so both inputs run through exactly the same code and give
identical tensors. Every image is converted to the model's channel count first (C=3: grayscale, palette,
RGBA (alpha composited over black), CMYK, 16-bit... -> RGB; C=1: -> L).

Speed: the PIL stages of the transform (resize, crop) run per image; the tensor stages (to-tensor and
normalise) run once on the stacked batch, which is what makes thousands of small images per second
possible. When the PIL stages are torchvision's ``Resize`` (no ``max_size``) then ``CenterCrop`` (timm's
``crop_mode="center"``, its default) they run leaner, with the same Pillow calls: the output size is
torchvision's own (``_compute_resized_output_size``), the image is resized by ``Image.resize`` with the same
filter and cropped as an array slice at torchvision's offsets, and a grayscale image for a 3-channel model is
resized once and replicated after normalising instead of being converted to RGB first (Pillow resamples every
band alike, so the bytes are those of the converted image); an image smaller than the crop takes timm's own
stages (padding). The result equals applying timm's transform image by image (checked by the tests).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import timm.data
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

try:  # what torchvision.transforms.functional.resize computes the output size with (private: checked, else None)
    from torchvision.transforms.functional import _compute_resized_output_size
except ImportError:  # pragma: no cover - another torchvision: timm's stages run as they are
    _compute_resized_output_size = None

from .data.sources import pil_to_uint8

_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


def _composite_rgb(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_channels(img: Image.Image, channels: int) -> Image.Image:
    """Convert a PIL image to mode RGB (channels=3) or L (channels=1)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = Image.fromarray(pil_to_uint8(img))
        mode = "L"
    if channels == 3:
        if mode == "RGB":
            return img
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            return _composite_rgb(img)
        return img.convert("RGB")
    if channels == 1:
        if mode == "L":
            return img
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
            return _composite_rgb(img).convert("L")
        return img.convert("L")
    raise ValueError(f"unsupported channel count {channels}; expected 1 or 3")


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """One uint8 image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> PIL image (L, RGB or RGBA)."""
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return Image.fromarray(np.ascontiguousarray(arr))
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return Image.fromarray(np.ascontiguousarray(arr))
    raise ValueError(f"expected an image of shape (H,W), (H,W,1), (H,W,3) or (H,W,4), got {arr.shape}")


class Preprocessor:
    """The model's eval transform, batched. ``pre(images) -> float32 tensor (N, C, H, W)``."""

    def __init__(self, data_config: dict):
        missing = [k for k in ("input_size", "mean", "std") if k not in data_config]
        if missing:
            raise ValueError(f"data_config lacks {missing}")
        self.data_config = {k: data_config[k] for k in _DATA_CONFIG_KEYS if k in data_config}
        self.input_size = tuple(int(v) for v in self.data_config["input_size"])
        self.channels = self.input_size[0]
        self.mean = tuple(float(v) for v in self.data_config["mean"])
        self.std = tuple(float(v) for v in self.data_config["std"])
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean/std must have one value per input channel")
        self.transform = timm.data.create_transform(**self.data_config, is_training=False)
        self._lean: tuple[list[int], int, tuple[int, int]] | None = None
        self._batched = self._split_transform()

    def _split_transform(self) -> bool:
        """Split timm's Compose into the PIL stages (per image) and the tensor stages (to-tensor + normalise, on
        the whole batch). False for an unexpected transform: timm's transform then runs image by image."""
        stages = list(self.transform.transforms) if isinstance(self.transform, T.Compose) else [self.transform]
        names = [type(t).__name__ for t in stages]
        cut = next((i for i, n in enumerate(names) if n in ("ToTensor", "MaybeToTensor", "PILToTensor")), None)
        if cut is None or len(stages) - cut != 2:
            return False
        if names[cut] not in ("ToTensor", "MaybeToTensor") or names[cut + 1] != "Normalize":
            return False
        self._pil_stages = T.Compose(stages[:cut])
        self._lean = self._lean_stages(stages[:cut])
        norm = stages[cut + 1]
        self._mean = torch.as_tensor(norm.mean, dtype=torch.float32).detach().clone().view(1, -1, 1, 1)
        self._std = torch.as_tensor(norm.std, dtype=torch.float32).detach().clone().view(1, -1, 1, 1)
        return True

    @staticmethod
    def _lean_stages(stages: list) -> tuple[list[int], int, tuple[int, int]] | None:
        """(resize size, Pillow filter, crop size) when the PIL stages are exactly torchvision's ``Resize`` (no
        ``max_size``) then ``CenterCrop``, else None (the stages then run as they are)."""
        if _compute_resized_output_size is None or [type(t) for t in stages] != [T.Resize, T.CenterCrop]:
            return None
        resize, crop = stages
        if resize.max_size is not None or resize.interpolation not in TF.pil_modes_mapping:
            return None
        size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
        csize = crop.size if isinstance(crop.size, (tuple, list)) else (crop.size, crop.size)
        if len(size) not in (1, 2) or len(csize) not in (1, 2):
            return None
        ch, cw = (int(csize[0]), int(csize[-1]))
        return size, TF.pil_modes_mapping[resize.interpolation], (ch, cw)

    def _lean_array(self, img: Image.Image) -> np.ndarray | None:
        """timm's PIL stages (resize, center crop) of one image as a uint8 array (H, W) or (H, W, C), through the
        same Pillow resize; None where the crop would pad (the image is smaller than the crop)."""
        assert self._lean is not None
        size, resample, (ch, cw) = self._lean
        oh, ow = _compute_resized_output_size((img.height, img.width), size, None)
        if ch > oh or cw > ow:
            return None
        if (oh, ow) != (img.height, img.width):
            img = img.resize((ow, oh), resample)
        top, left = int(round((oh - ch) / 2.0)), int(round((ow - cw) / 2.0))
        return np.asarray(img)[top:top + ch, left:left + cw]

    def _lean_call(self, pils: list[Image.Image]) -> torch.Tensor:
        """:meth:`__call__` over the lean stages (module docstring); ``pils`` may hold grayscale (mode L) images
        for a 3-channel model, replicated after normalising."""
        arrays: list[np.ndarray] = []
        for p in pils:
            a = self._lean_array(p)
            if a is None:  # smaller than the crop: timm's stages (padding), at the model's channels
                a = np.asarray(self._pil_stages(to_channels(p, self.channels)), dtype=np.uint8)
            arrays.append(a)
        if all(a.ndim == 2 for a in arrays):  # one band each: normalised once per model channel
            gray = torch.from_numpy(np.stack(arrays)).unsqueeze(1).float().div_(255.0)
            return gray.expand(-1, self.channels, -1, -1).sub(self._mean).div_(self._std).contiguous()
        return self._normalised([np.repeat(a[:, :, None], self.channels, axis=2) if a.ndim == 2 else a
                                 for a in arrays])

    def _normalised(self, arrays: list[np.ndarray]) -> torch.Tensor:
        """timm's tensor stages (to-tensor, normalise) once over uint8 images (H, W, C) of one size: (N, C, H, W)."""
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return batch.sub_(self._mean).div_(self._std).contiguous()

    def __repr__(self) -> str:
        return f"Preprocessor(input_size={self.input_size}, mean={self.mean}, std={self.std})"

    def to_pil_list(self, images, keep_gray: bool = False) -> list[Image.Image]:
        """Validate and convert the input to a list of PIL images with the model's channel count (``keep_gray``:
        grayscale (mode L) images stay grayscale for a 3-channel model)."""
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(f"expected a uint8 array, got {images.dtype}")
            if images.ndim not in (3, 4):
                raise ValueError(f"expected an array (N,H,W) or (N,H,W,C), got shape {images.shape}")
            pils = [array_to_pil(a) for a in images]
        else:
            pils = []
            for im in images:
                if isinstance(im, Image.Image):
                    pils.append(im)
                elif isinstance(im, np.ndarray):
                    pils.append(array_to_pil(im))
                else:
                    raise TypeError(f"expected PIL images or uint8 arrays, got {type(im).__name__}")
        if not pils:
            raise ValueError("no images given")
        if keep_gray:
            return [p if p.mode == "L" else to_channels(p, self.channels) for p in pils]
        return [to_channels(p, self.channels) for p in pils]

    def __call__(self, images: Sequence[Image.Image] | np.ndarray | Iterable) -> torch.Tensor:
        if self._batched and self._lean is not None:
            return self._lean_call(self.to_pil_list(images, keep_gray=True))
        pils = self.to_pil_list(images)
        if not self._batched:
            return torch.stack([self.transform(p) for p in pils]).float()
        arrays = []
        for p in pils:
            q = self._pil_stages(p)
            a = np.asarray(q, dtype=np.uint8)
            if a.ndim == 2:
                a = a[:, :, None]
            arrays.append(a)
        return self._normalised(arrays)

    def single(self, image: Image.Image) -> torch.Tensor:
        """timm's eval transform applied to one image, exactly as timm does (C, H, W)."""
        return self.transform(to_channels(image, self.channels))
