"""Reader for domain-folder trees: ROOT/<domain>/<severity>/<class>/<image> (the ImageNet-C layout) and
ROOT/<domain>/<class>/<image> (a user's own shifts: photos per camera, per site, per season ...).

Domain folders may have any names. A domain folder whose sub-folders are numbers that themselves hold folders
has severities (key ``(domain, severity)``, display name ``"<domain>-<severity>"``); any other domain folder is
one flat domain (key and display name: the folder name). Both kinds may be mixed in one tree. A folder with
``train/`` and ``test/`` is a split dataset, not a tree; a folder whose images sit directly in its sub-folders
is a plain dataset (DIR/<class>/<image>), not a tree.

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
from typing import Any

import numpy as np

from .sources import ImageFolderSource

__all__ = ["MANIFEST_NAME", "DomainKey", "ImageNetC", "is_domain_tree", "is_imagenet_c_tree", "load_class_index"]

MANIFEST_NAME = "manifest.json"


def _subdirs(path: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _has_subdir(path: Path) -> bool:
    with os.scandir(path) as it:
        return any(e.is_dir() and not e.name.startswith(".") for e in it)


def _severity_levels(domain_dir: Path) -> list[int]:
    """The numeric sub-folders of a domain folder that hold class folders (its severities), sorted."""
    return sorted(int(s) for s in _subdirs(domain_dir) if s.isdigit() and _has_subdir(domain_dir / s))


DomainKey = str | tuple[str, int]


def load_class_index(mapping: dict[str, int] | Sequence[str] | str | os.PathLike) -> dict[str, int]:
    """Normalise a class-index mapping: a dict name->index, a list of names, or a JSON file of either.

    A JSON dict whose values are lists (like torchvision's ``imagenet_class_index.json``:
    {"0": ["n01440764", "tench"], ...}) is read as index -> [folder name, label].
    """
    m: Any = json.loads(Path(mapping).read_text()) if isinstance(mapping, (str, os.PathLike)) else mapping
    if isinstance(m, dict):
        if m and all(isinstance(v, (list, tuple)) for v in m.values()):
            return {str(v[0]): int(k) for k, v in m.items()}
        return {str(k): int(v) for k, v in m.items()}
    return {str(name): i for i, name in enumerate(m)}


class ImageNetC:
    """An ImageNet-C style tree. ``domain(corruption, severity)`` gives a lazy labelled source."""

    def __init__(self, root: str | os.PathLike,
                 class_index: dict[str, int] | Sequence[str] | str | os.PathLike | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet-C root {self.root} does not exist")
        # domain folder -> its severities ([] for a flat domain ROOT/<domain>/<class>/<image>)
        self._layout: dict[str, list[int]] = {}
        for c in _subdirs(self.root):
            sev = _severity_levels(self.root / c)
            if sev or _has_subdir(self.root / c):
                self._layout[c] = sev
        if not self._layout:
            raise ValueError(f"{self.root} has no domain folders (expected ROOT/<domain>/<class>/<image> or "
                             "ROOT/<domain>/<severity>/<class>/<image>)")
        self._class_to_idx = load_class_index(class_index) if class_index is not None else None
        self._domains: dict[DomainKey, ImageFolderSource] = {}
        manifest = self.root / MANIFEST_NAME
        self.manifest: dict | None = json.loads(manifest.read_text()) if manifest.is_file() else None

    # ------------------------------------------------------------------ listing
    def corruptions(self) -> list[str]:
        """The domain folder names (corruptions for an ImageNet-C tree)."""
        return list(self._layout)

    def severities(self, corruption: str) -> list[int]:
        """The severities of a domain folder ([] for a flat domain)."""
        try:
            return list(self._layout[corruption])
        except KeyError:
            raise KeyError(f"domain {corruption!r} not in {self.root}; has {self.corruptions()}") from None

    def domains(self, severity: int | None = None) -> list[DomainKey]:
        """Every domain key: ``(name, severity)`` for folders with severities (only ``severity`` when given and
        present), the plain name for flat domain folders."""
        out: list[DomainKey] = []
        for c, sevs in self._layout.items():
            if not sevs:
                out.append(c)
            else:
                keep = [s for s in sevs if severity is None or s == int(severity)] or sevs
                out.extend((c, s) for s in keep)
        return out

    def has_domain(self, corruption: str, severity: int | None = None) -> bool:
        if corruption not in self._layout:
            return False
        sevs = self._layout[corruption]
        return not sevs if severity is None else int(severity) in sevs

    def resolve(self, name: str, severity: int | None = None) -> DomainKey:
        """The domain key a user's name means: a flat domain folder ``name``; ``name`` at ``severity`` (or its only
        severity); ``"<name>-<severity>"``. Unknown names raise ValueError listing the tree's domains."""
        if name in self._layout:
            sevs = self._layout[name]
            if not sevs:
                return name
            if severity is not None and int(severity) in sevs:
                return (name, int(severity))
            if len(sevs) == 1 and severity is None:
                return (name, sevs[0])
            raise ValueError(f"domain {name!r} of {self.root} has severities {sevs}, not {severity}")
        base, _, sev = name.rpartition("-")
        if sev.isdigit() and self.has_domain(base, int(sev)):
            return (base, int(sev))
        names = [_key_name(d) for d in self.domains()]
        raise ValueError(f"domain {name!r} not found under {self.root}; it has {', '.join(names[:20])}"
                         + (" ..." if len(names) > 20 else ""))

    def select(self, names: Sequence[str] | None = None, severity: int | None = None) -> list[DomainKey]:
        """Domain keys for a user's list: every domain at ``severity`` when ``names`` is empty, else each name
        resolved (:meth:`resolve`); "clean" stays "clean" (a tree's ``clean/`` folder or, for readers that have
        one, the uncorrupted source)."""
        if not names:
            return self.domains(severity)
        return ["clean" if n == "clean" and not self.has_domain(n) else self.resolve(n, severity) for n in names]

    @property
    def class_to_idx(self) -> dict[str, int]:
        """Explicit mapping if given; else the manifest's class names (make-c trees); else sorted folder names
        (union over all domains)."""
        if self._class_to_idx is None:
            if self.manifest and self.manifest.get("class_names"):
                names = [str(n) for n in self.manifest["class_names"]]
            else:
                found: set[str] = set()
                for d in self.domains():
                    found.update(_subdirs(self._path(d)))
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
    def _path(self, key: DomainKey) -> Path:
        return self.root / key if isinstance(key, str) else self.root / key[0] / str(int(key[1]))

    def domain(self, corruption: str, severity: int | None = None) -> ImageFolderSource:
        """The lazy labelled source of one domain: ``(name, severity)`` or a flat domain ``name``."""
        key: DomainKey = corruption if severity is None else (corruption, int(severity))
        if key not in self._domains:
            if not self.has_domain(corruption, severity):
                raise KeyError(f"domain {_key_name(key)} not found under {self.root}")
            path = self._path(key)
            folders = _subdirs(path)
            mapping = self.class_to_idx
            unknown = [f for f in folders if f not in mapping]
            if unknown:
                raise ValueError(f"{path}: class folders {unknown[:5]} are not in the class-index mapping")
            src = ImageFolderSource(path, class_to_idx=mapping, class_names=self.class_names)
            src.describe = _describer(self.root, corruption, severity, len(src))  # type: ignore[method-assign]
            self._domains[key] = src
        return self._domains[key]

    def __len__(self) -> int:
        return sum(len(self.domain(*((d,) if isinstance(d, str) else d))) for d in self.domains())

    def iter_domain(self, corruption: str, severity: int | None = None) -> Iterable[tuple[np.ndarray, int]]:
        src = self.domain(corruption, severity)
        for i in range(len(src)):
            yield src[i]

    def describe(self) -> dict:
        d = {"kind": "imagenet_c_tree", "root": str(self.root), "corruptions": self.corruptions(),
             "severities": {c: self.severities(c) for c in self.corruptions()}}
        if self.manifest:
            d["manifest"] = {k: self.manifest[k] for k in ("source", "split", "seed") if k in self.manifest}
        return d


def _key_name(key: DomainKey) -> str:
    return key if isinstance(key, str) else f"{key[0]}-{key[1]}"


def _describer(root: Path, corruption: str, severity: int | None, n: int):
    def describe() -> dict:
        return {"kind": "imagenet_c_domain", "root": str(root), "corruption": corruption,
                "severity": None if severity is None else int(severity), "num_samples": n}
    return describe


def is_imagenet_c_tree(path: str | os.PathLike) -> bool:
    """True if ``path`` is a domain-folder tree (see the module docstring): it holds a make-c manifest, or at least
    one domain folder with class folders below it. Not a tree: a plain dataset DIR/<class>/<image>, a split dataset
    DIR/train/ + DIR/test/, or one domain's severity level DIR/<severity>/<class>/ (all sub-folders numeric)."""
    p = Path(path)
    if not p.is_dir():
        return False
    if (p / MANIFEST_NAME).is_file():
        return True
    subs = _subdirs(p)
    if not subs or ("train" in subs and "test" in subs):
        return False
    if all(s.isdigit() for s in subs) and not any(_severity_levels(p / s) for s in subs):
        return False
    return any(_has_subdir(p / s) for s in subs)


is_domain_tree = is_imagenet_c_tree
