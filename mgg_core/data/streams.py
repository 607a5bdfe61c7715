"""Declarative test streams for online test-time adaptation.

One dataclass, :class:`StreamSpec`, says what a stream is; :func:`iter_batches` turns it into
:class:`Batch` objects lazily. Only an index plan (a few int arrays) is held in memory; images are
decoded and corrupted per batch, either on the fly from a labelled source (MNIST-5k, a folder) or read
from a generated ImageNet-C tree (``mgg data make-c`` output or the real ImageNet-C).

Domains are ``"clean"``, ``(corruption, severity)`` or, in a tree, a flat domain folder's name (any name:
``DIR/<domain>/<class>/<image>``). Every domain covers every sample of the source once
(on the fly), or every file of its folder (tree). Orders:

* ``"sequential"``: domain after domain, in the listed order; batches never span two domains; samples
  within a domain are shuffled (seeded) or, with label shift, ordered by the Dirichlet scheme below.
* ``"mixed"``: all (domain, sample) pairs of all domains shuffled together, so domains interleave at random
  (batches mix domains).

Reset policy (``Batch.reset_before`` says "reset the adaptation state before this batch"; the first batch
never carries it, a stream starts from the source model): ``"per_domain"`` (sequential only: before the
first batch of every new domain), ``"never"``, or ``("every", N)``: before batches N, 2N, ...

Label shift (``label_shift = alpha``, Dirichlet concentration; ``None`` = i.i.d. shuffle): the non-i.i.d.
ordering used in the continual/non-i.i.d. TTA literature. Time is cut into ``num_classes`` slots; for each
class a vector of slot proportions is drawn from Dir(alpha * 1); the class's (shuffled) samples are split
over the slots by those proportions; the stream then plays slot after slot, the samples within a slot
shuffled. Small alpha puts each class in one or two slots (batches dominated by few classes, classes
appear and disappear over time); large alpha spreads every class over all slots (close to i.i.d.).

The corruption of on-the-fly domains is seeded per (spec.seed, corruption, severity, source index), so a
sample's corrupted pixels do not depend on batch size, order or label shift, and equal the PNG that
``mgg data make-c --seed <spec.seed>`` writes for it.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .corruptions import TEST_CORRUPTIONS, check_corruption, corrupt_image, prepare_image

CLEAN = "clean"
Domain = Any  # "clean" | tuple[str, int]


def normalise_domain(d) -> str | tuple[str, int]:
    """``"clean"``; ``(name, severity)`` from a pair or ``"name-severity"``; any other name as it is (a flat domain
    folder of a tree, ``DIR/<domain>/<class>/<image>``). Whether a name exists is checked when the stream's data is
    known (:func:`stream_plan`): on-the-fly data needs known corruptions, a tree needs its own folders."""
    if isinstance(d, str):
        if d == CLEAN:
            return CLEAN
        name, _, sev = d.rpartition("-")
        if name and sev.isdigit():
            return (name, int(sev))
        if not d or "/" in d:
            raise ValueError(f"bad domain {d!r}: use 'clean', a domain folder name, 'name-severity' or "
                             "[name, severity]")
        return d
    if isinstance(d, (list, tuple)) and len(d) == 2:
        return (str(d[0]), int(d[1]))
    raise ValueError(f"bad domain {d!r}")


def domain_name(d) -> str:
    """Display name: ``"clean"``, ``"<corruption>-<severity>"`` (e.g. ``"gaussian_noise-5"``) or a flat domain's
    folder name."""
    d = normalise_domain(d)
    return d if isinstance(d, str) else f"{d[0]}-{d[1]}"


def check_on_the_fly(domains) -> None:
    """On-the-fly data (a labelled source, corrupted per sample) can only make ``"clean"`` and known
    corruptions at severities 1-5; raise a ValueError naming the first domain it cannot make."""
    for d in domains:
        if d == CLEAN:
            continue
        if isinstance(d, str):
            raise ValueError(f"unknown corruption {d!r}: on-the-fly data makes 'clean' and corruption-severity "
                             "domains; a domain folder needs a tree DIR/<domain>/[<severity>/]<class>/<image>")
        check_corruption(*d)


@dataclass
class StreamSpec:
    """A test stream, declaratively. JSON round-trip: ``StreamSpec.from_json(spec.to_json()) == spec``."""

    domains: list = field(default_factory=lambda: [(c, 5) for c in TEST_CORRUPTIONS])
    order: str = "sequential"  # "sequential" | "mixed"
    batch_size: int = 64
    reset: Any = "per_domain"  # "per_domain" | "never" | ("every", N)
    label_shift: float | None = None  # Dirichlet alpha; None = i.i.d.
    seed: int = 0
    # at most this many samples per domain (a seeded, class-stratified subset, the same in every domain)
    limit: int | None = None
    data: str = "mnist5k"  # where samples come from when iter_batches() gets no source: "mnist5k", a folder or a tree
    split: str = "test"

    def __post_init__(self) -> None:
        self.domains = [normalise_domain(d) for d in self.domains]
        if not self.domains:
            raise ValueError("a stream needs at least one domain")
        if len(set(self.domains)) != len(self.domains):
            raise ValueError("domains must be distinct")
        if self.data == "mnist5k":
            check_on_the_fly(self.domains)
        if self.order not in ("sequential", "mixed"):
            raise ValueError("order must be 'sequential' or 'mixed'")
        self.batch_size = int(self.batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        r = self.reset
        if isinstance(r, (list, tuple)):
            if len(r) != 2 or r[0] != "every" or int(r[1]) < 1:
                raise ValueError("reset must be 'per_domain', 'never' or ('every', N>=1)")
            self.reset = ("every", int(r[1]))
        elif r not in ("per_domain", "never"):
            raise ValueError("reset must be 'per_domain', 'never' or ('every', N>=1)")
        if self.reset == "per_domain" and self.order == "mixed" and len(self.domains) > 1:
            raise ValueError("reset='per_domain' needs order='sequential' (mixed batches span domains)")
        if self.label_shift is not None:
            self.label_shift = float(self.label_shift)
            if not self.label_shift > 0:
                raise ValueError("label_shift (Dirichlet alpha) must be > 0 or None")
        self.seed = int(self.seed)
        if self.limit is not None:
            self.limit = int(self.limit)
            if self.limit < 1:
                raise ValueError("limit must be >= 1 or None")

    # -------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["domains"] = [x if isinstance(x, str) else [x[0], x[1]] for x in self.domains]
        d["reset"] = list(self.reset) if isinstance(self.reset, tuple) else self.reset
        return d

    @classmethod
    def from_dict(cls, d: dict) -> StreamSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown StreamSpec fields: {sorted(unknown)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> StreamSpec:
        return cls.from_dict(json.loads(text))

    @property
    def domain_names(self) -> list[str]:
        return [domain_name(d) for d in self.domains]


def default_stream_spec(**overrides) -> StreamSpec:
    """The default benchmark stream: MNIST-5k test split x 15 corruptions x severity 5, batch 64,
    sequential, reset per domain, i.i.d. order within a domain, seed 0."""
    kw: dict[str, Any] = dict(domains=[(c, 5) for c in TEST_CORRUPTIONS], order="sequential", batch_size=64,
                              reset="per_domain", label_shift=None, seed=0, limit=None, data="mnist5k", split="test")
    kw.update(overrides)
    return StreamSpec(**kw)


@dataclass
class Batch:
    index: int  # batch number in the stream, from 0
    images: np.ndarray | list  # uint8 (N,H,W,3) when all images share a shape, else a list of uint8 arrays
    labels: np.ndarray  # int64 (N,)
    domains: list[str]  # domain name per sample
    reset_before: bool  # reset the adaptation state before this batch
    sample_indices: np.ndarray  # int64 (N,): index of each sample within its domain's source

    def __len__(self) -> int:
        return len(self.labels)


# ------------------------------------------------------------------------------- ordering helpers

def dirichlet_order(labels: np.ndarray, alpha: float, rng: np.random.Generator,
                    num_slots: int | None = None) -> np.ndarray:
    """A permutation of ``range(len(labels))`` with Dirichlet label shift (see the module docstring)."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    slots = int(num_slots) if num_slots else max(1, len(classes))
    per_slot: list[list[np.ndarray]] = [[] for _ in range(slots)]
    for c in classes:
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        p = rng.dirichlet(np.full(slots, alpha))
        cuts = np.floor(np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
        for s, part in enumerate(np.split(idx, cuts)):
            per_slot[s].append(part)
    order = []
    for parts in per_slot:
        if parts:
            slot = np.concatenate(parts)
            order.append(slot[rng.permutation(len(slot))])
    out = np.concatenate(order) if order else np.zeros(0, dtype=np.int64)
    return out.astype(np.int64)


def _subset(labels: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """All indices, or a class-stratified random subset of ``limit`` of them (sorted)."""
    n = len(labels)
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / n * limit).astype(np.int64)
    rest = limit - int(quota.sum())
    if rest > 0:  # largest remainders
        frac = counts / n * limit - quota
        quota[np.argsort(-frac, kind="stable")[:rest]] += 1
    keep = []
    for c, q in zip(classes, quota, strict=True):
        idx = np.flatnonzero(labels == c)
        keep.extend(idx[rng.permutation(len(idx))[:q]].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64))


def _rng(seed: int, *keys: int | str) -> np.random.Generator:
    ints = [seed & 0xFFFFFFFF] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF for k in keys]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(ints)))


# ------------------------------------------------------------------------------- data access

class _DomainData:
    """Labels + lazy image access for one domain, from a source (on the fly) or a tree."""

    def __init__(self, domain, source, tree, seed: int):
        self.domain = domain
        self.name = domain_name(domain)
        self.seed = seed
        if tree is not None:
            if domain == CLEAN and not tree.has_domain(CLEAN):
                raise ValueError(f"the tree {tree.root} has no 'clean' domain folder; stream clean data from its "
                                 "source (the plain dataset folder or mnist5k)")
            if isinstance(domain, str):
                if not tree.has_domain(domain):
                    tree.resolve(domain)                 # raises, naming the tree's domains
                self.src = tree.domain(domain)
            elif tree.has_domain(*domain):
                self.src = tree.domain(*domain)
            elif tree.has_domain(self.name):             # a flat folder whose name ends in -<digits>
                self.src = tree.domain(self.name)
            else:
                tree.resolve(domain[0], domain[1])       # raises, naming the tree's domains
            self.on_the_fly = False
        else:
            self.src = source
            self.on_the_fly = True
        self.labels = np.asarray(self.src.labels, dtype=np.int64)

    def image(self, i: int) -> np.ndarray:
        img = self.src.get_image(int(i))
        if not self.on_the_fly:
            return img
        if self.domain == CLEAN:
            return prepare_image(img)  # RGB, >= 32 px: the same form as the corrupted images
        c, s = self.domain
        return corrupt_image(img, c, s, seed=self.seed, index=int(i))


def open_stream_source(spec: StreamSpec):
    """The labelled source or ImageNet-C tree named by ``spec.data`` / ``spec.split``."""
    from .imagenet_c import ImageNetC, is_imagenet_c_tree
    from .sources import open_source

    if spec.data != "mnist5k" and is_imagenet_c_tree(spec.data):
        return ImageNetC(spec.data)
    return open_source(spec.data, spec.split)


def stream_plan(spec: StreamSpec, source=None) -> tuple[list[_DomainData], list[tuple[np.ndarray, np.ndarray]]]:
    """The index plan: per-domain data handles and a list of batches, each (domain ids, sample indices)."""
    from .imagenet_c import ImageNetC

    if source is None:
        source = open_stream_source(spec)
    tree = source if isinstance(source, ImageNetC) else None
    if tree is None:
        check_on_the_fly(spec.domains)
    doms = [_DomainData(d, None if tree is not None else source, tree, spec.seed) for d in spec.domains]
    per_domain: list[tuple[np.ndarray, np.ndarray]] = []
    for k, dd in enumerate(doms):
        rng = _rng(spec.seed, "subset")  # the same subset in every domain (same labels -> same picks)
        idx = _subset(dd.labels, spec.limit, rng)
        per_domain.append((np.full(len(idx), k, dtype=np.int64), idx))

    batches: list[tuple[np.ndarray, np.ndarray]] = []
    bs = spec.batch_size
    if spec.order == "sequential":
        for k, (dom_ids, idx) in enumerate(per_domain):
            rng = _rng(spec.seed, "order", doms[k].name)
            if spec.label_shift is None:
                perm = rng.permutation(len(idx))
            else:
                perm = dirichlet_order(doms[k].labels[idx], spec.label_shift, rng)
            dom_ids, idx = dom_ids[perm], idx[perm]
            for b in range(0, len(idx), bs):
                batches.append((dom_ids[b:b + bs], idx[b:b + bs]))
    else:
        dom_ids = np.concatenate([p[0] for p in per_domain])
        idx = np.concatenate([p[1] for p in per_domain])
        rng = _rng(spec.seed, "mixed")
        if spec.label_shift is None:
            perm = rng.permutation(len(idx))
        else:
            labels = np.concatenate([doms[k].labels[p[1]] for k, p in enumerate(per_domain)])
            perm = dirichlet_order(labels, spec.label_shift, rng)
        dom_ids, idx = dom_ids[perm], idx[perm]
        for b in range(0, len(idx), bs):
            batches.append((dom_ids[b:b + bs], idx[b:b + bs]))
    return doms, batches


def num_batches(spec: StreamSpec, source=None) -> int:
    return len(stream_plan(spec, source)[1])


def _reset_flags(spec: StreamSpec, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[bool]:
    flags = []
    for b, (dom_ids, _) in enumerate(batches):
        if b == 0 or spec.reset == "never":
            flags.append(False)
        elif spec.reset == "per_domain":
            flags.append(int(dom_ids[0]) != int(batches[b - 1][0][0]))
        else:
            flags.append(b % spec.reset[1] == 0)
    return flags


def iter_batches(spec: StreamSpec, source=None, start: int = 0) -> Iterator[Batch]:
    """Yield the stream's batches lazily (images loaded/corrupted per batch).

    ``source``: a labelled source (samples corrupted on the fly), an :class:`~mgg_core.data.imagenet_c.ImageNetC`
    tree (files read as they are), or None to open ``spec.data``. ``start`` skips the first batches without
    loading them (to resume a stream).
    """
    doms, batches = stream_plan(spec, source)
    flags = _reset_flags(spec, batches)
    for b in range(start, len(batches)):
        dom_ids, idx = batches[b]
        imgs = [doms[int(k)].image(int(i)) for k, i in zip(dom_ids, idx, strict=True)]
        labels = np.asarray([doms[int(k)].labels[int(i)] for k, i in zip(dom_ids, idx, strict=True)], dtype=np.int64)
        if all(im.shape == imgs[0].shape for im in imgs):
            images: np.ndarray | list = np.stack(imgs)
        else:
            images = imgs
        yield Batch(index=b, images=images, labels=labels, domains=[doms[int(k)].name for k in dom_ids],
                    reset_before=flags[b], sample_indices=idx.copy())
