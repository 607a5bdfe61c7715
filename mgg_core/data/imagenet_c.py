"""Reader for the ImageNet-C folder layout: ROOT/<corruption>/<severity>/<class>/<image>.

Works on trees written by ``mgg data make-c`` and on the real ImageNet-C (75 folders of 50,000 JPEGs:
only directory listings happen up front, images are decoded lazily). Class names are the class folder
names, sorted, taken from the union over the domains that are opened; an explicit class-index mapping
(dict name -> index, list of names, or a JSON file holding either) can impose another order, e.g. the
standard ImageNet indices for WordNet ids.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .sources import ImageFolderSource

MANIFEST_NAME = "manifest.json"


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def load_class_index(mapping: dict[str, int] | Sequence[str] | str | os.PathLike) -> dict[str, int]:
    """Normalise a class-index mapping: a dict name->index, a list of names, or a JSON file of either.

    A JSON dict whose values are lists (like torchvision's ``imagenet_class_index.json``:
    {"0": ["n01440764", "tench"], ...}) is read as index -> [folder name, label].
    """
    if isinstance(mapping, (str, os.PathLike)):
        mapping = json.loads(Path(mapping).read_text())
    if isinstance(mapping, dict):
        if mapping and all(isinstance(v, (list, tuple)) for v in mapping.values()):
            return {str(v[0]): int(k) for k, v in mapping.items()}
        return {str(k): int(v) for k, v in mapping.items()}
    return {str(name): i for i, name in enumerate(mapping)}


class ImageNetC:
    """An ImageNet-C style tree. ``domain(corruption, severity)`` gives a lazy labelled source."""

    def __init__(self, root: str | os.PathLike,
                 class_index: dict[str, int] | Sequence[str] | str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet-C root {self.root} does not exist")
        self._layout: dict[str, list[int]] = {}
        for c in _subdirs(self.root):
            sev = sorted(int(s) for s in _subdirs(self.root / c) if s.isdigit())
            if sev:
                self._layout[c] = sev
        if not self._layout:
            raise ValueError(f"{self.root} has no <corruption>/<severity>/ folders")
        self._class_to_idx = load_class_index(class_index) if class_index is not None else None
        self._domains: dict[tuple[str, int], ImageFolderSource] = {}
        manifest = self.root / MANIFEST_NAME
        self.manifest: dict | None = json.loads(manifest.read_text()) if manifest.is_file() else None

    # ------------------------------------------------------------------ listing
    def corruptions(self) -> list[str]:
        return list(self._layout)

    def severities(self, corruption: str) -> list[int]:
        try:
            return list(self._layout[corruption])
        except KeyError:
            raise KeyError(f"corruption {corruption!r} not in {self.root}; has {self.corruptions()}") from None

    def domains(self) -> list[tuple[str, int]]:
        return [(c, s) for c, sevs in self._layout.items() for s in sevs]

    def has_domain(self, corruption: str, severity: int) -> bool:
        return int(severity) in self._layout.get(corruption, [])

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Explicit mapping if given; else the manifest's class names (make-c trees); else sorted folder names
        (union over all domains)."""
        if self._class_to_idx is None:
            if self.manifest and self.manifest.get("class_names"):
                names = [str(n) for n in self.manifest["class_names"]]
            else:
                found: set[str] = set()
                for c, s in self.domains():
                    found.update(_subdirs(self.root / c / str(s)))
                names = sorted(found)
            self._class_to_idx = {n: i for i, n in enumerate(names)}
        return self._class_to_idx

    @property
    def class_names(self) -> list[str]:
        m = self.class_to_idx
        names = [""] * (max(m.values()) + 1)
        for n, i in m.items():
            names[i] = n
        return names

    # ------------------------------------------------------------------ data
    def domain(self, corruption: str, severity: int) -> ImageFolderSource:
        key = (corruption, int(severity))
        if key not in self._domains:
            if not self.has_domain(*key):
                raise KeyError(f"domain {corruption}/{severity} not found under {self.root}")
            path = self.root / corruption / str(int(severity))
            folders = _subdirs(path)
            mapping = self.class_to_idx
            unknown = [f for f in folders if f not in mapping]
            if unknown:
                raise ValueError(f"{path}: class folders {unknown[:5]} are not in the class-index mapping")
            src = ImageFolderSource(path, class_to_idx=mapping, class_names=self.class_names)
            src.describe = _describer(self.root, corruption, int(severity), len(src))  # type: ignore[method-assign]
            self._domains[key] = src
        return self._domains[key]

    def __len__(self) -> int:
        return sum(len(self.domain(c, s)) for c, s in self.domains())

    def iter_domain(self, corruption: str, severity: int) -> Iterable[tuple[np.ndarray, int]]:
        src = self.domain(corruption, severity)
        for i in range(len(src)):
            yield src[i]

    def describe(self) -> dict:
        d = {"kind": "imagenet_c_tree", "root": str(self.root), "corruptions": self.corruptions(),
             "severities": {c: self.severities(c) for c in self.corruptions()}}
        if self.manifest:
            d["manifest"] = {k: self.manifest[k] for k in ("source", "split", "seed") if k in self.manifest}
        return d


def _describer(root: Path, corruption: str, severity: int, n: int):
    def describe() -> dict:
        return {"kind": "imagenet_c_domain", "root": str(root), "corruption": corruption, "severity": severity,
                "num_samples": n}
    return describe


def is_imagenet_c_tree(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a make-c manifest, or a folder named after a known corruption with numeric severity
    sub-folders (so a class folder named "0" in DIR/train/0/ is not mistaken for a severity)."""
    from .corruptions import ALL_CORRUPTIONS

    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MANIFEST_NAME).is_file():
        return True
    return any(c in ALL_CORRUPTIONS and any(s.isdigit() for s in _subdirs(p / c)) for c in _subdirs(p))
