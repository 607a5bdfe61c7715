"""Stream plans: one :class:`mgg_core.data.streams.StreamSpec` per replayed stream, turned into batches.

Data: ``mnist5k-c`` (the embedded MNIST-5k test split, corrupted on the fly), a plain dataset folder
(DIR/<class>/<image>, its test split corrupted on the fly) or a tree of domain folders with any names
(DIR/<domain>/<class>/<image> or DIR/<domain>/<severity>/<class>/<image>). Domain ``clean`` is the uncorrupted
split (or a tree's ``clean`` folder).

Stream ``i`` uses seed ``base.seed + i`` (its own subset, order within domains, corruption noise) and, with
``domain_order="shuffled"``, its own domain order drawn from that seed. Batches are uint8 images with labels.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MNIST_C = "mnist5k-c"


@dataclass
class Batch:
    """One request's worth of a stream: uint8 images (N,H,W[,C]), their labels and the domain they come from."""

    images: np.ndarray
    labels: np.ndarray
    domain: str  # the batch's domain, or "mixed" when its samples come from several
    reset_before: bool = False  # reset the stream before sending this batch (StreamSpec reset policy)
    sample_domains: list[str] | None = None  # domain of each image (None = all ``domain``)


@dataclass
class StreamPlan:
    """What one replayed stream will send: an id, a seed, a domain order and a batch iterator factory."""

    stream_id: str
    seed: int
    domains: list[str]
    total_images: int | None
    make_batches: Callable[[], Iterator[Batch]]
    describe: dict[str, Any] = field(default_factory=dict)


DEFAULT_MNIST_C_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "pixelate", "jpeg_compression")


@dataclass
class SpecOptions:
    """How the CLI derives one :class:`mgg_core.data.streams.StreamSpec` per replayed stream."""

    data: str = MNIST_C
    spec_file: str | None = None  # a StreamSpec JSON: the base spec (CLI stream options are then ignored)
    corruptions: list[str] | None = None  # None = DEFAULT_MNIST_C_CORRUPTIONS / every domain of the tree
    severity: int = 5
    images_per_domain: int | None = 256  # StreamSpec.limit
    batch_size: int = 64
    order: str = "sequential"  # StreamSpec.order
    reset: str = "never"  # StreamSpec.reset: never | per_domain | every:N
    label_shift: float | None = None
    domain_order: str = "shuffled"  # "fixed" (same for every stream) or "shuffled" (per-stream, from its seed)
    seed: int = 0
    streams: int = 2


def _parse_reset(text: Any) -> Any:
    if isinstance(text, str) and text.startswith("every:"):
        return ("every", int(text.split(":", 1)[1]))
    return text


def _tree_domains(root: str, severity: int, names: list[str] | None = None) -> list[Any]:
    """Domains of a tree of domain folders (any names; flat or with severities): the named ones or every domain at
    ``severity``. A plain dataset folder (DIR/<class>/<image>) is corrupted on the fly: the named corruptions (or
    the default six) at ``severity``."""
    from mgg_core.data.imagenet_c import ImageNetC, is_imagenet_c_tree

    if not is_imagenet_c_tree(root):
        return [_on_the_fly_domain(c, severity) for c in (names or DEFAULT_MNIST_C_CORRUPTIONS)]
    return ImageNetC(root).select(names, severity)


CLEAN = "clean"


def _on_the_fly_domain(name: str, severity: int) -> Any:
    """'clean' (the uncorrupted split), 'name-severity', or a corruption name at ``severity``."""
    if name == CLEAN:
        return CLEAN
    base, _, sev = name.rpartition("-")
    return name if base and sev.isdigit() else (name, severity)


def base_spec(opts: SpecOptions) -> Any:
    """The stream spec every replayed stream starts from."""
    from mgg_core.data.streams import StreamSpec

    if opts.spec_file:
        return StreamSpec.from_json(Path(opts.spec_file).read_text(encoding="utf-8"))
    data = "mnist5k" if opts.data in (MNIST_C, "mnist5k") else str(opts.data)
    if data != "mnist5k" and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder (and not {MNIST_C!r})")
    if data == "mnist5k":
        domains = [_on_the_fly_domain(c, opts.severity) for c in (opts.corruptions or DEFAULT_MNIST_C_CORRUPTIONS)]
    else:
        domains = list(_tree_domains(data, opts.severity, opts.corruptions))
    return StreamSpec(domains=domains, order=opts.order, batch_size=opts.batch_size, reset=_parse_reset(opts.reset),
                      label_shift=opts.label_shift, seed=opts.seed, limit=opts.images_per_domain, data=data)


def stream_specs(opts: SpecOptions) -> list[Any]:
    """One spec per stream: seed ``base.seed + i`` (its own subset, order within domains, corruption noise) and,
    with ``domain_order="shuffled"``, its own domain order drawn from that seed."""
    base = base_spec(opts)
    specs = []
    for i in range(opts.streams):
        domains = list(base.domains)
        if opts.domain_order == "shuffled" and len(domains) > 1:
            rng = np.random.default_rng([int(base.seed) & 0xFFFFFFFF, i, 0x5EED])
            domains = [domains[k] for k in rng.permutation(len(domains))]
        elif opts.domain_order not in ("fixed", "shuffled"):
            raise ValueError(f"unknown domain order {opts.domain_order!r}; choose fixed or shuffled")
        specs.append(dataclasses.replace(base, domains=domains, seed=base.seed + i))
    return specs


def _spec_batches(spec: Any, source: Any) -> Iterator[Batch]:
    from mgg_core.data.streams import iter_batches

    for b in iter_batches(spec, source):
        doms = list(b.domains)
        domain = doms[0] if all(d == doms[0] for d in doms) else "mixed"
        images = b.images
        if not isinstance(images, np.ndarray):  # differently sized images: multipart only
            arr = np.empty(len(images), dtype=object)
            arr[:] = list(images)
            images = arr
        yield Batch(images, np.asarray(b.labels), domain, bool(b.reset_before), doms)


def build_plans(opts: SpecOptions, stream_prefix: str, fmt: str = "npy"
                ) -> tuple[list[StreamPlan], list[str], dict[str, Any]]:
    from mgg_core.data.streams import open_stream_source, stream_plan

    if opts.streams < 1:
        raise ValueError("--streams must be at least 1")
    specs = stream_specs(opts)
    source = open_stream_source(specs[0])  # shared (read-only) by every stream
    class_names = list(getattr(source, "class_names", None) or [])
    def batches_of(spec: Any) -> Callable[[], Iterator[Batch]]:
        return lambda: _spec_batches(spec, source)

    plans = []
    for i, spec in enumerate(specs):
        _, batches = stream_plan(spec, source)
        total = int(sum(len(idx) for _, idx in batches))
        plans.append(StreamPlan(
            stream_id=f"{stream_prefix}-{i}", seed=spec.seed, domains=list(spec.domain_names), total_images=total,
            make_batches=batches_of(spec),
            describe={"stream_spec": spec.to_dict(), "num_batches": len(batches)},
        ))
    if fmt == "npy":  # fail early rather than on the first mixed-size batch
        first = next(iter(plans[0].make_batches()), None)
        if first is not None and first.images.dtype == object:
            raise ValueError("the images of this data differ in size and cannot form one .npy batch; use --format png")
    description = {"base_spec": base_spec(opts).to_dict(), "per_stream": "seed = base seed + stream index"
                   + ("; domain order shuffled per stream from its seed" if opts.domain_order == "shuffled" else ""),
                   "source": source.describe() if hasattr(source, "describe") else str(opts.data)}
    return plans, class_names, description
