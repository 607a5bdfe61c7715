"""`mgg bench`: methods x corruptions over one online stream (a StreamSpec); table, JSON protocol and plot.

    mgg bench --classifier vit --out docs/results/vit_reset --sweep-lrs 1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1
    mgg bench --classifier vit --out docs/results/vit_continual --reset never \
              --sweep-from docs/results/vit_reset/results.json
    mgg bench --data /data/imagenet-c --model vit_base_patch16_224 --weights vit.safetensors \
              --clean-data /data/imagenet/train --mgg-checkpoint mgg_vitb.safetensors --device cuda \
              --lr tent=1e-3 eata=1e-3 sar=1e-3 deyo=1e-3 foa=1e-3 mgg=1e-3 --out runs/in-c    # ImageNet-C

Protocol (defaults): the 15 ImageNet-C test corruptions at severity 5 of the source's TEST split, batch 64, one
online pass, predictions made before each update, the stream reset to source at every corruption boundary
(``--reset per_domain``) or never (``--reset never``, continual); any sequential StreamSpec via ``--stream``.
Every method sees exactly the same batches (the spec's seeded order). Methods: noadapt, bn (BatchNorm models
only), tent, eata, sar, deyo, foa (FOA loss + SGD) and mgg (FOA loss + the MGG optimizer).

Learning rates are NEVER chosen on the test corruptions: ``--sweep-lrs`` runs every gradient method over the same
grid on the 4 held-out corruptions (speckle_noise, spatter, gaussian_blur, saturate) of a validation subset of the
source's TRAIN split, streamed with the test stream's reset policy, and picks each method's best; the sweep is
recorded in the JSON (``--sweep-from`` reuses a recorded one, ``--lr METHOD=LR`` sets one explicitly).

Results are cached per (method, domain) under ``OUT/cache`` (continual streams also keep the stream-state
snapshot after each domain), keyed by a protocol fingerprint, so an interrupted run resumes where it stopped.
Corrupted images are generated once into ``--cache-dir`` (uint8 npz per domain, the pixels of ``mgg data make-c``).
Updates-to-reference: the first batch from which a method's online accuracy curve reaches TENT's final online
accuracy and stays there.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .assets import (
    clean_train_batches,
    default_mgg_checkpoint,
    mgg_checkpoint_for,
    mgg_loss_kwargs,
    source_stats_for,
    stats_path_for,
)
from .classifier import file_sha256
from .cli import add_threads_argument
from .data.corruptions import HELDOUT_CORRUPTIONS, check_corruption, corrupt_image, prepare_image
from .engine import AdaptationEngine, EngineConfig, compute_fisher
from .features import compute_source_stats, load_stats
from .io import atomic_path, atomic_write_text
from .methods import METHODS, Method
from .optim import MGG, OPTIMIZERS, OptimInfo
from .registry import Registry

#: the optimizer every registered method runs with in the bench (the papers' own); optimizers that declare a
#: ``bench_method`` also run as a method of their own name (``mgg`` = FOA loss + the MGG optimizer)
BENCH_OPTIMIZER = "sgd"


@dataclass(frozen=True)
class BenchMethod:
    """One row of the bench: an engine method with an optimizer, read from the method and optimizer registries."""

    name: str
    method: type[Method]
    optimizer: OptimInfo | None                   # None: the method takes no gradient step
    reference_lr: float | None                    # reference step size (ViT-B/16 / ResNet-50, batch 64)


def _bench_methods() -> Registry[BenchMethod]:
    reg: Registry[BenchMethod] = Registry("bench method")
    for name, cls in METHODS.items():
        opt = OPTIMIZERS.get(BENCH_OPTIMIZER) if cls.needs_grad else None
        reg.add(name, BenchMethod(name, cls, opt, cls.reference_lr if cls.needs_grad else None))
    for name, info in OPTIMIZERS.items():
        if info.bench_method is not None:
            reg.add(name, BenchMethod(name, METHODS.get(info.bench_method), info, info.default_lr))
    return reg


BENCH_METHODS = _bench_methods()
ALL_METHODS = tuple(BENCH_METHODS.names())
DEFAULT_METHODS = ALL_METHODS
#: bench method name -> (engine method, optimizer)
METHOD_PARTS = {n: (b.method.name, b.optimizer.name if b.optimizer else None) for n, b in BENCH_METHODS.items()}
#: reference step sizes (ViT-B/16 / ResNet-50, batch 64); the small models use the held-out sweep instead
REFERENCE_LR = {n: b.reference_lr for n, b in BENCH_METHODS.items() if b.reference_lr is not None}
DEFAULT_SWEEP = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_CACHE_DIR = Path(os.environ.get("MGG_CACHE_DIR", Path.home() / ".cache" / "mgg"))
VAL_IMAGES = 1000          # held-out validation subset of the TRAIN split (sweeps, MGG checkpoint selection)
VAL_SEED = 1234
FISHER_IMAGES = 512        # clean TRAIN images for EATA's Fisher


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, flush=True)


def _fingerprint(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ============================================================================================== data
@dataclass
class Domain:
    """One test domain: labelled images, in memory (uint8, already corrupted) or read lazily from a source.

    ``index`` are the source indices of the rows (``images[k]`` is source sample ``index[k]``)."""

    name: str
    corruption: str
    severity: int
    labels: np.ndarray
    index: np.ndarray
    images: np.ndarray | None = None              # (N, H, W, 3) uint8
    source: object | None = None                  # lazily read with get_image(source index)
    description: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def rows(self, source_idx: np.ndarray) -> np.ndarray:
        pos = {int(i): k for k, i in enumerate(self.index)}
        return np.asarray([pos[int(i)] for i in source_idx], dtype=np.int64)

    def get(self, rows: np.ndarray) -> list[np.ndarray] | np.ndarray:
        if self.images is not None:
            return self.images[rows]
        return [self.source.get_image(int(self.index[r])) for r in rows]


def corrupted_images(source, indices: np.ndarray, corruption: str, severity: int, seed: int,
                     cache_dir: str | os.PathLike | None, source_id: str, progress: bool = False) -> np.ndarray:
    """uint8 (N, H, W, 3) of ``corrupt_image(source.get_image(i), corruption, severity, seed, index=i)`` for i in
    ``indices`` (the seeding of ``mgg data make-c`` and of ``data.streams``: the same pixels), cached as one npz
    per domain. ``corruption == "clean"`` gives the prepared clean images."""
    indices = np.asarray(indices, dtype=np.int64)
    key = _fingerprint([source_id, corruption, int(severity), int(seed), hashlib.sha1(indices.tobytes()).hexdigest()])
    path = Path(cache_dir) / f"{source_id}-{corruption}-{severity}-{key}.npz" if cache_dir else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["images"]
    if corruption != "clean":
        check_corruption(corruption, severity)
    from tqdm import tqdm

    out = []
    for i in tqdm(indices, desc=f"corrupt {corruption}", disable=not progress, leave=False, dynamic_ncols=True):
        img = source.get_image(int(i))
        out.append(prepare_image(img) if corruption == "clean" else corrupt_image(img, corruption, severity, seed, int(i)))
    arr = np.stack(out)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=arr)
    return arr


def validation_indices(n_train: int, n: int = VAL_IMAGES, seed: int = VAL_SEED) -> np.ndarray:
    """The held-out validation subset of the TRAIN split (sorted indices); pretraining samples avoid it."""
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n_train)
    return np.sort(perm[: min(n, n_train)])


def _train_size(data: str) -> int:
    from .data.sources import open_source

    return len(open_source(data, "train"))


def _source_id(data: str, split: str) -> str:
    base = data if data == "mnist5k" else hashlib.sha1(str(Path(data).resolve()).encode()).hexdigest()[:10]
    return f"{base}-{split}"


def synthetic_domains(data: str, split: str, corruptions: Sequence[str], severity: int, seed: int,
                      cache_dir, indices: np.ndarray | None = None, progress: bool = False) -> list[Domain]:
    """Corrupted copies (generated once, cached) of ``indices`` of ``data`` ("mnist5k" or a folder) ``split``."""
    from .data.sources import open_source

    source = open_source(data, split)
    indices = np.arange(len(source)) if indices is None else np.asarray(indices, dtype=np.int64)
    out = []
    for c in corruptions:
        imgs = corrupted_images(source, indices, c, severity, seed, cache_dir, _source_id(data, split), progress)
        out.append(Domain(name=f"{c}-{severity}", corruption=c, severity=severity,
                          labels=np.asarray(source.labels)[indices], index=indices, images=imgs,
                          description={"source": source.describe(), "num_samples": int(len(indices))}))
    return out


def stream_domains(spec, cache_dir, progress: bool = False) -> list[tuple[Domain, np.ndarray]]:
    """The domains of a sequential :class:`~mgg_core.data.streams.StreamSpec` with each domain's sample order
    (source indices) from the spec's own plan; on-the-fly corruptions are generated once and cached."""
    from .data.imagenet_c import ImageNetC
    from .data.streams import CLEAN, open_stream_source, stream_plan

    if spec.order != "sequential":
        raise ValueError("mgg bench needs a sequential stream (order='sequential'): results are per domain")
    if isinstance(spec.reset, tuple):
        raise ValueError("mgg bench supports reset 'per_domain' or 'never'")
    source = open_stream_source(spec)
    doms, plan = stream_plan(spec, source)
    orders: list[list[np.ndarray]] = [[] for _ in doms]
    for dom_ids, idx in plan:
        orders[int(dom_ids[0])].append(idx)
    out = []
    for k, dd in enumerate(doms):
        order = np.concatenate(orders[k])
        used = np.sort(order)
        c, s = (CLEAN, 0) if dd.domain == CLEAN else dd.domain
        if isinstance(source, ImageNetC):
            d = Domain(dd.name, c, s, labels=dd.labels[used], index=used, source=dd.src, description=dd.src.describe())
        else:
            imgs = corrupted_images(source, used, c, s, spec.seed, cache_dir, _source_id(spec.data, spec.split), progress)
            d = Domain(dd.name, c, s, labels=np.asarray(source.labels)[used], index=used, images=imgs,
                       description={"source": source.describe(), "num_samples": int(len(used))})
        out.append((d, order))
    return out


class PreparedDomain:
    """A domain in a fixed sample order, preprocessed for one model (in memory when small, lazily otherwise).

    ``order``: source indices in stream order (a StreamSpec plan); default: a seeded permutation."""

    MAX_IN_MEMORY = 2 ** 30  # bytes of float32 input

    def __init__(self, domain: Domain, preprocessor, order: np.ndarray | None = None, order_seed: int = 0):
        self.domain = domain
        self.pre = preprocessor
        if order is None:
            gen = np.random.Generator(np.random.PCG64([order_seed, int(hashlib.sha1(domain.name.encode()).hexdigest()[:8], 16)]))
            self.rows = gen.permutation(len(domain))
        else:
            self.rows = domain.rows(order)
        self.y = torch.as_tensor(domain.labels[self.rows], dtype=torch.long)
        c, h, w = preprocessor.input_size
        self.x = None
        if len(self.rows) * c * h * w * 4 <= self.MAX_IN_MEMORY:
            self.x = torch.cat([self.pre(domain.get(self.rows[i:i + 512])) for i in range(0, len(self.rows), 512)])

    def __len__(self) -> int:
        return len(self.y)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), batch_size):
            if self.x is not None:
                yield self.x[i:i + batch_size], self.y[i:i + batch_size]
            else:
                yield self.pre(self.domain.get(self.rows[i:i + batch_size])), self.y[i:i + batch_size]


# ============================================================================================== engines
@dataclass
class Setup:
    """Everything a method run needs besides its own name and lr."""

    classifier: object
    source_stats: dict | None = None
    fisher: torch.Tensor | None = None
    mgg_checkpoint: str | None = None
    device: str = "cpu"


def has_batchnorm(model) -> bool:
    from .params import batchnorm_layers

    return bool(batchnorm_layers(model))


def build_engine(setup: Setup, method: str, lr: float | None, method_kwargs: dict | None = None, gml=None):
    """The AdaptationEngine for a bench method ("mgg" = FOA loss + MGG optimizer)."""
    entry = BENCH_METHODS.get(method)
    opt = entry.optimizer
    needs_ckpt = opt is not None and opt.needs_checkpoint
    if opt is not None and opt.loss_from_checkpoint_card and method_kwargs is None and gml is None \
            and setup.mgg_checkpoint:
        method_kwargs = mgg_loss_kwargs(setup.mgg_checkpoint)   # MGG is deployed with the loss it was trained on
    optimizer = None
    if gml is not None:                                # an in-memory GML (pretrain's validation), not a checkpoint
        optimizer = MGG(gml, lr=lr if lr is not None else (entry.reference_lr or 1e-3))
    elif needs_ckpt and setup.mgg_checkpoint is None:
        raise ValueError(f"method {method!r} needs an MGG checkpoint (--mgg-checkpoint or a bundled default)")
    cfg = EngineConfig(method=entry.method.name, optimizer=opt.name if opt else None, lr=lr,
                       method_kwargs=dict(method_kwargs or {}),
                       mgg_checkpoint=setup.mgg_checkpoint if needs_ckpt else None, device=setup.device)
    fisher = setup.fisher if entry.method.uses_fisher else None
    stats = setup.source_stats if entry.method.uses_source_stats else None
    return AdaptationEngine(setup.classifier, cfg, source_stats=stats, fisher=fisher, optimizer=optimizer)


@dataclass
class DomainResult:
    domain: str
    correct: list[int]        # per batch
    count: list[int]          # per batch
    adapted: list[bool]       # per batch
    seconds: float
    resets: int = 0
    rollbacks: int = 0

    @property
    def accuracy(self) -> float:
        return 100.0 * sum(self.correct) / max(1, sum(self.count))

    @property
    def updates(self) -> int:
        return int(sum(self.adapted))

    def to_dict(self) -> dict:
        return {"domain": self.domain, "accuracy": self.accuracy, "updates": self.updates, "correct": self.correct,
                "count": self.count, "adapted": [int(a) for a in self.adapted], "seconds": self.seconds,
                "resets": self.resets, "rollbacks": self.rollbacks}

    @classmethod
    def from_dict(cls, d: dict) -> DomainResult:
        return cls(domain=d["domain"], correct=list(d["correct"]), count=list(d["count"]),
                   adapted=[bool(a) for a in d["adapted"]], seconds=float(d["seconds"]),
                   resets=int(d.get("resets", 0)), rollbacks=int(d.get("rollbacks", 0)))


def run_domain(engine, state, domain: PreparedDomain, batch_size: int) -> DomainResult:
    t0 = time.perf_counter()
    correct, count, adapted = [], [], []
    resets0 = state.resets
    rollbacks = 0
    for x, y in domain.batches(batch_size):
        res = engine.step(state, x)
        correct.append(int((res.logits.argmax(1) == y).sum()))
        count.append(int(y.numel()))
        adapted.append(bool(res.adapted))
        rollbacks += int(res.rolled_back)
    return DomainResult(domain.domain.name, correct, count, adapted, time.perf_counter() - t0,
                        resets=state.resets - resets0, rollbacks=rollbacks)


def run_stream(engine, domains: Sequence[PreparedDomain], batch_size: int, reset: str = "domain", seed: int = 0,
               cache: ResultCache | None = None, method: str = "", on_domain: Callable | None = None) -> list[DomainResult]:
    """One method over the stream; ``reset``: "domain" (reset at every domain boundary) or "never" (continual)."""
    if reset not in ("domain", "never"):
        raise ValueError(f"reset must be 'domain' or 'never', not {reset!r}")
    state = engine.new_state(seed=seed)
    results: list[DomainResult] = []
    for i, d in enumerate(domains):
        cached = cache.get(method, i, d.domain.name) if cache is not None else None
        if cached is not None:
            results.append(cached)
            if reset == "never" and i + 1 < len(domains):
                nxt = cache.get(method, i + 1, domains[i + 1].domain.name)
                if nxt is None:  # resume the continual stream from the snapshot after this domain
                    state = engine.load_state(cache.state_path(method, i))
            if on_domain:
                on_domain(cached)
            continue
        if reset == "domain":
            state = engine.new_state(seed=seed)
        r = run_domain(engine, state, d, batch_size)
        results.append(r)
        if cache is not None:
            if reset == "never":
                state.save(cache.state_path(method, i))
            cache.put(method, i, r)
        if on_domain:
            on_domain(r)
    return results


class ResultCache:
    """Per (method, domain) results as JSON under DIR/<method>/, valid only for one protocol fingerprint."""

    def __init__(self, root: str | os.PathLike, protocols: dict[str, str]):
        self.root = Path(root)
        self.protocols = protocols  # method -> fingerprint

    def _path(self, method: str, i: int, name: str) -> Path:
        return self.root / method / f"{i:03d}_{name}.json"

    def state_path(self, method: str, i: int) -> Path:
        return self.root / method / f"{i:03d}.state.safetensors"

    def get(self, method: str, i: int, name: str) -> DomainResult | None:
        p = self._path(method, i, name)
        if not p.is_file():
            return None
        d = json.loads(p.read_text())
        if d.get("protocol") != self.protocols[method]:
            return None
        return DomainResult.from_dict(d)

    def put(self, method: str, i: int, r: DomainResult) -> None:
        p = self._path(method, i, r.domain)
        atomic_write_text(p, json.dumps(dict(r.to_dict(), protocol=self.protocols[method])))


# ============================================================================================== curves and metrics
def online_curve(results: Sequence[DomainResult], reset: str) -> np.ndarray:
    """Cumulative online accuracy (%) after k batches. With resets: averaged over domains at the same batch index
    within the domain (domains of unequal length are cut to the shortest); continual: along the whole stream."""
    if reset == "domain":
        k = min(len(r.correct) for r in results)
        curves = [np.cumsum(r.correct[:k]) / np.cumsum(r.count[:k]) for r in results]
        return 100.0 * np.mean(curves, axis=0)
    c = np.concatenate([r.correct for r in results])
    n = np.concatenate([r.count for r in results])
    return 100.0 * np.cumsum(c) / np.cumsum(n)


def batches_to_reach(curve: np.ndarray, target: float) -> int | None:
    """Smallest k (1-based, number of batches = update opportunities) from which the curve reaches ``target`` and
    stays at or above it to the end (so an early lucky batch does not count), or None."""
    below = np.flatnonzero(curve < target - 1e-9)
    if below.size == 0:
        return 1
    k = int(below[-1]) + 2
    return k if k <= len(curve) else None


def summarize(all_results: dict[str, list[DomainResult]], reset: str, reference: str = "tent") -> dict:
    summary = {}
    curves = {m: online_curve(r, reset) for m, r in all_results.items()}
    for m, rs in all_results.items():
        summary[m] = {"mean_accuracy": float(np.mean([r.accuracy for r in rs])),
                      "per_domain": {r.domain: r.accuracy for r in rs},
                      "updates": int(sum(r.updates for r in rs)),
                      "batches": int(sum(len(r.correct) for r in rs)),
                      "seconds": float(sum(r.seconds for r in rs))}
    if reference in curves:
        target = float(curves[reference][-1])
        n_ref = len(curves[reference])
        for m, c in curves.items():
            k = batches_to_reach(c, target)
            summary[m]["batches_to_reference_final"] = k
            summary[m]["fraction_of_reference_batches"] = None if k is None else k / n_ref
        summary["_reference"] = {"method": reference, "final_online_accuracy": target, "batches": n_ref}
    return summary


# ============================================================================================== report
def markdown_table(summary: dict, domains: Sequence[str], methods: Sequence[str], title: str = "") -> str:
    short = [d.rsplit("-", 1)[0] for d in domains]
    lines = [f"### {title}", ""] if title else []
    lines.append("| method | mean | " + " | ".join(short) + " |")
    lines.append("| --- | ---: | " + " | ".join("---:" for _ in short) + " |")
    best = max(summary[m]["mean_accuracy"] for m in methods)
    for m in methods:
        s = summary[m]
        mean = f"{s['mean_accuracy']:.1f}"
        mean = f"**{mean}**" if abs(s["mean_accuracy"] - best) < 1e-9 else mean
        lines.append(f"| {m} | {mean} | " + " | ".join(f"{s['per_domain'][d]:.1f}" for d in domains) + " |")
    ref = summary.get("_reference")
    if ref:
        lines += ["", f"Batches (= update opportunities) after which the online accuracy curve reaches and keeps "
                  f"{ref['method'].upper()}'s final online accuracy ({ref['final_online_accuracy']:.1f}%, after "
                  f"{ref['batches']} batches):", "",
                  "| method | batches | fraction of " + ref["method"].upper() + "'s |", "| --- | ---: | ---: |"]
        for m in methods:
            k = summary[m].get("batches_to_reference_final")
            frac = summary[m].get("fraction_of_reference_batches")
            lines.append(f"| {m} | {'never' if k is None else k} | {'-' if frac is None else f'{frac:.2f}'} |")
    return "\n".join(lines) + "\n"


def plot_curves(all_results: dict[str, list[DomainResult]], reset: str, path: str | os.PathLike, title: str,
                batch_size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for m, rs in all_results.items():
        c = online_curve(rs, reset)
        opt = BENCH_METHODS.get(m).optimizer if m in BENCH_METHODS else None
        ax.plot(np.arange(1, len(c) + 1), c, label=m, lw=2.2 if opt is not None and opt.highlight else 1.3)
    ax.set_xlabel("test batches seen (= online update opportunities)" + (", per domain" if reset == "domain" else ""))
    ax.set_ylabel("online accuracy (%)" + (" (mean over domains)" if reset == "domain" else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ============================================================================================== setup
def load_any_classifier(classifier: str | None, model: str | None = None, weights: str | None = None,
                        num_classes: int = 1000, device: str = "cpu"):
    """A bundled/carded classifier ("vit", "resnet", a .safetensors with its card) or a plain timm model with a
    local weights file (``model`` + ``weights``; ImageNet-C)."""
    from .classifier import LoadedClassifier, default_checkpoint, load_classifier

    if model is None:
        ck = default_checkpoint(classifier) if classifier in ("vit", "resnet") else classifier
        return load_classifier(ck, device=device)
    import timm
    import timm.data

    from .preprocess import Preprocessor

    if weights is None:
        raise ValueError("--model needs --weights (a local file; there is no model hub here)")
    m = timm.create_model(model, pretrained=True, num_classes=num_classes,
                          pretrained_cfg_overlay=dict(file=str(Path(weights).resolve()), num_classes=num_classes))
    m.eval().requires_grad_(False)
    m.to(device)
    cfg = timm.data.resolve_data_config({}, model=m)

    class _Card:  # the small part of a ClassifierCard the bench reads
        model_name = model
        dataset = {"kind": "imagenet"}
        card_num_classes = num_classes

    return LoadedClassifier(model=m, card=_Card(), data_config=cfg, preprocessor=Preprocessor(cfg),
                            checkpoint_path=Path(weights), device=torch.device(device))


def _clean_batches_from_folder(clf, folder: str, n: int, batch_size: int = 64, seed: int = 0):
    from .data.sources import ImageFolderSource

    src = ImageFolderSource(folder)
    idx = np.random.Generator(np.random.PCG64(seed)).permutation(len(src))[:n]
    for i in range(0, len(idx), batch_size):
        yield clf.preprocessor([src.get_image(int(j)) for j in idx[i:i + batch_size]])


def _parse_lrs(items: Sequence[str] | None) -> dict[str, float]:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        if not v or k not in METHOD_PARTS:
            raise ValueError(f"--lr takes METHOD=VALUE with METHOD in {list(METHOD_PARTS)}, got {it!r}")
        out[k] = float(v)
    return out


def sweep_lrs(setup: Setup, methods: Sequence[str], grid: Sequence[float], domains: Sequence[PreparedDomain],
              batch_size: int, cache_root: Path, base_protocol: dict, seed: int = 0, progress: bool = True,
              quiet: bool = False, reset: str = "domain") -> dict:
    """Every gradient method over the same lr grid on held-out domains, streamed with the test stream's reset
    policy (``reset``: "domain" or "never"); the best mean held-out accuracy wins."""
    from tqdm import tqdm

    grad_methods = [m for m in methods if BENCH_METHODS.get(m).optimizer is not None]
    keys = {f"{m}@{lr:g}": _fingerprint(dict(base_protocol, method=m, lr=lr, kind="sweep", reset=reset))
            for m in grad_methods
            for lr in grid}
    cache = ResultCache(cache_root, keys)
    table: dict[str, dict[str, float]] = {}
    bar = tqdm(total=len(keys) * len(domains), desc="held-out lr sweep", disable=not progress, dynamic_ncols=True)
    for m in grad_methods:
        table[m] = {}
        for lr in grid:
            key = f"{m}@{lr:g}"
            eng = build_engine(setup, m, lr)
            res = run_stream(eng, domains, batch_size, reset=reset, seed=seed, cache=cache, method=key,
                             on_domain=lambda r: bar.update(1))
            table[m][f"{lr:g}"] = float(np.mean([r.accuracy for r in res]))
    bar.close()
    chosen = {m: float(max(table[m], key=lambda k: table[m][k])) for m in grad_methods}
    for m in grad_methods:
        _log(f"  sweep {m}: " + "  ".join(f"{k}:{v:.1f}" for k, v in table[m].items()) + f"  -> {chosen[m]:g}", quiet)
    return {"grid": [float(g) for g in grid], "held_out_mean_accuracy": table, "chosen": chosen}


def bench(out: str | os.PathLike, spec=None, classifier: str | None = "vit", model: str | None = None,
          weights: str | None = None, methods: Sequence[str] = DEFAULT_METHODS,
          lrs: dict[str, float] | None = None, sweep: Sequence[float] | None = None, sweep_from: str | None = None,
          val_images: int = VAL_IMAGES, mgg_checkpoint: str | None = None,
          source_stats: str | None = None, clean_data: str | None = None, num_classes: int = 1000,
          cache_dir=None, device: str = "cpu", progress: bool = True, quiet: bool = False,
          title: str | None = None) -> dict:
    """Run the benchmark over ``spec`` (a sequential :class:`~mgg_core.data.streams.StreamSpec`; default: the
    MNIST-5k-C test stream); writes OUT/results.json, results.md, online_accuracy.png; returns the JSON."""
    from .data.streams import default_stream_spec

    spec = spec if spec is not None else default_stream_spec()
    data, split, seed, batch_size = spec.data, spec.split, spec.seed, spec.batch_size
    reset = "domain" if spec.reset == "per_domain" else spec.reset
    severities = sorted({d[1] for d in spec.domains if d != "clean"})
    severity = severities[0] if len(severities) == 1 else severities
    corruptions = [d if d == "clean" else d[0] for d in spec.domains]
    from tqdm import tqdm

    from .classifier import library_versions

    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    clf = load_any_classifier(classifier, model, weights, num_classes=num_classes, device=device)
    weights_path = Path(clf.checkpoint_path)
    weights_sha = file_sha256(weights_path)
    needs_bn = [n for n, b in BENCH_METHODS.items() if b.method.requires_batchnorm]
    methods = [m for m in methods if m not in needs_bn or has_batchnorm(clf.model)]
    skipped_methods = [m for m in needs_bn if m not in methods]

    # ---- source statistics (FOA/MGG), Fisher (EATA), MGG checkpoint
    needs_stats = any(BENCH_METHODS.get(m).method.uses_source_stats for m in methods)
    stats, stats_origin = None, None
    if needs_stats:
        if source_stats:
            stats, stats_origin = load_stats(source_stats), str(source_stats)
        elif clean_data:
            eng = AdaptationEngine(clf, EngineConfig(method="foa", optimizer="sgd", device=device))
            stats = compute_source_stats(eng.source_features, _clean_batches_from_folder(clf, clean_data, 2000))
            stats_origin = f"computed from 2000 clean images of {clean_data}"
        else:
            stats = source_stats_for(clf, data=data if data == "mnist5k" else None, device=device)
            p = stats_path_for(weights_path)
            stats_origin = str(p.name) if p.is_file() else f"computed from clean {data} train"
    fisher, fisher_origin = None, None
    fisher_method = next((BENCH_METHODS.get(m).method.name for m in methods
                          if BENCH_METHODS.get(m).method.uses_fisher), None)
    if fisher_method is not None:
        eng = AdaptationEngine(clf, EngineConfig(method=fisher_method, optimizer="sgd", device=device))
        if clean_data:
            fisher = compute_fisher(eng, _clean_batches_from_folder(clf, clean_data, 2000))
            fisher_origin = f"2000 clean images of {clean_data}"
        elif data == "mnist5k":
            vi = validation_indices(_train_size(data), val_images)
            fisher = compute_fisher(eng, clean_train_batches(clf, data, FISHER_IMAGES, 64, seed=seed + 1, exclude=vi))
            fisher_origin = f"{FISHER_IMAGES} clean {data} train images (outside the validation subset)"
        else:
            fisher_origin = "none (no clean data given): EATA runs without its Fisher regulariser"
    if any(BENCH_METHODS.get(m).optimizer and BENCH_METHODS.get(m).optimizer.needs_checkpoint  # type: ignore[union-attr]
           for m in methods) and mgg_checkpoint is None:
        found = mgg_checkpoint_for(clf)
        if found is None and classifier in ("vit", "resnet") and model is None:
            found = default_mgg_checkpoint(classifier)
        if found is None or not Path(found).is_file():
            raise FileNotFoundError("no MGG checkpoint for this classifier: pass --mgg-checkpoint (train one with "
                                    "`mgg pretrain`)")
        mgg_checkpoint = str(found)
    setup = Setup(classifier=clf, source_stats=stats, fisher=fisher, mgg_checkpoint=mgg_checkpoint, device=device)

    # ---- the test stream
    _log(f"preparing {len(spec.domains)} domains ...", quiet)
    planned = stream_domains(spec, cache_dir, progress=progress)
    raw = [d for d, _ in planned]
    domains = [PreparedDomain(d, clf.preprocessor, order=o) for d, o in planned]
    domain_names = [d.domain.name for d in domains]

    base_protocol = {
        "model": getattr(clf.card, "model_name", model), "weights_sha256": weights_sha,
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in clf.preprocessor.data_config.items()},
        "stream": spec.to_dict(),
        "mgg_checkpoint_sha256": file_sha256(mgg_checkpoint) if mgg_checkpoint else None,
        "stats_sha": _fingerprint([v.tolist() for v in stats.values()]) if stats is not None else None,
        "fisher_sha": _fingerprint(fisher.tolist()) if fisher is not None else None,
    }

    # ---- step sizes: explicit > held-out sweep (this run or a previous results.json) > reference
    lr_source: dict[str, str] = {}
    chosen = {m: REFERENCE_LR[m] for m in methods if m in REFERENCE_LR}
    lr_source.update({m: "reference (ViT-B/16, batch 64)" for m in chosen})
    sweep_record = None
    if sweep_from:
        prev = json.loads(Path(sweep_from).read_text())
        sweep_record = dict(prev["protocol"]["lr_sweep"], taken_from=str(sweep_from))
        for m, v in sweep_record["chosen"].items():
            if m in chosen:
                chosen[m], lr_source[m] = float(v), f"held-out sweep ({sweep_from})"
    elif sweep:
        if data != "mnist5k":
            raise ValueError("--sweep-lrs needs the held-out corruptions of the source's train split (mnist5k); "
                             "for other data pass --lr METHOD=VALUE")
        vi = validation_indices(_train_size(data), val_images)
        val = [PreparedDomain(d, clf.preprocessor, order_seed=seed)
               for d in synthetic_domains(data, "train", HELDOUT_CORRUPTIONS, 5, seed, cache_dir, indices=vi,
                                          progress=progress)]
        sweep_record = sweep_lrs(setup, methods, sweep, val, batch_size, out / "cache" / f"sweep-{reset}",
                                 dict(base_protocol, stream=None, split="train", held_out=list(HELDOUT_CORRUPTIONS),
                                      val_images=val_images), seed=seed, progress=progress, quiet=quiet,
                                 reset=reset)
        sweep_record["data"] = {"split": "train", "images": int(len(vi)), "corruptions": list(HELDOUT_CORRUPTIONS),
                                "severity": 5, "batch_size": batch_size,
                                "reset": "per corruption" if reset == "domain" else "never (continual, 4 domains in order)",
                                "order": f"seeded permutation per domain (seed {seed})"}
        for m, v in sweep_record["chosen"].items():
            chosen[m], lr_source[m] = v, "held-out sweep"
    for m, v in (lrs or {}).items():
        chosen[m], lr_source[m] = v, "given (--lr)"

    # ---- run
    engines_desc, protocols = {}, {}
    for m in methods:
        eng = build_engine(setup, m, chosen.get(m))
        engines_desc[m] = eng.describe()
        protocols[m] = _fingerprint(dict(base_protocol, method=m, reset=reset, domains=domain_names,
                                         describe=engines_desc[m]))
    cache = ResultCache(out / "cache" / f"reset-{reset}", protocols)
    all_results: dict[str, list[DomainResult]] = {}
    bar = tqdm(total=len(methods) * len(domains), desc="bench", disable=not progress, dynamic_ncols=True)
    for m in methods:
        bar.set_postfix(method=m)
        eng = build_engine(setup, m, chosen.get(m))
        all_results[m] = run_stream(eng, domains, batch_size, reset=reset, seed=seed, cache=cache, method=m,
                                    on_domain=lambda r: bar.update(1))
    bar.close()

    summary = summarize(all_results, reset)
    setting = "reset per corruption" if reset == "domain" else "continual (no reset)"
    title = title or f"{base_protocol['model']} | {len(domains)} corruptions, severity {severity} | batch {batch_size} | {setting}"
    table = markdown_table(summary, domain_names, methods, title=title)
    plot_curves(all_results, reset, out / "online_accuracy.png", title, batch_size)
    result = {
        "title": title,
        "protocol": {
            "model": base_protocol["model"], "weights_file": weights_path.name, "weights_sha256": weights_sha,
            "preprocessing": base_protocol["data_config"],
            "dataset": {"data": data, "split": split, "description": raw[0].description if raw else None},
            "corruptions": list(corruptions), "severity": severity, "batch_size": batch_size,
            "images_per_domain": [len(d) for d in domains],
            "stream": spec.to_dict(),
            "stream_order": {"domains": domain_names, "within_domain": (
                f"seeded permutation (seed {seed})" if spec.label_shift is None
                else f"Dirichlet label shift alpha={spec.label_shift} (seed {seed})")},
            "reset": {"domain": "reset to source at every corruption boundary", "never": "continual, never reset"}[reset],
            "reset_policy": reset, "one_pass": True, "predictions": "before each update",
            "seed": seed, "device": device, "versions": library_versions(),
            "methods": {m: {"engine": engines_desc[m], "lr": chosen.get(m), "lr_source": lr_source.get(m)}
                        for m in methods},
            "skipped_methods": {m: "the model has no BatchNorm layer" for m in skipped_methods},
            "source_stats": stats_origin, "fisher": fisher_origin,
            "mgg_checkpoint": Path(mgg_checkpoint).name if mgg_checkpoint else None,
            "mgg_checkpoint_sha256": base_protocol["mgg_checkpoint_sha256"],
            "lr_sweep": sweep_record,
            "metric": "online accuracy: top-1 of the predictions made before each update",
            "curve": "cumulative online accuracy after k batches" + (", mean over domains" if reset == "domain" else ""),
        },
        "summary": summary,
        "results": {m: [r.to_dict() for r in rs] for m, rs in all_results.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(table)
    _log(table, quiet)
    _log(f"wrote {out}/results.json, results.md, online_accuracy.png in {result['seconds']:.0f} s", quiet)
    return result


# ============================================================================================== CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark TTA methods over corrupted streams (table, JSON, plot)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, online_accuracy.png, cache/)")
    p.add_argument("--classifier", default="vit", help="'vit', 'resnet' (bundled) or a classifier .safetensors")
    p.add_argument("--model", default=None, help="timm model name for a plain weights file (ImageNet-C)")
    p.add_argument("--weights", default=None, help="local weights file for --model")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--stream", default=None,
                   help="a StreamSpec as JSON text or a .json file (overrides the stream options below)")
    p.add_argument("--data", default="mnist5k",
                   help="'mnist5k' (corruptions generated once and cached) or an ImageNet-C tree ROOT/<corruption>/<severity>/<class>/")
    p.add_argument("--split", default="test")
    p.add_argument("--corruptions", nargs="+", default=["test"], metavar="NAME",
                   help="corruption names, or 'test' (the 15), 'heldout' (4)")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--reset", choices=("per_domain", "never"), default="per_domain",
                   help="'per_domain': reset at every corruption; 'never': continual")
    p.add_argument("--label-shift", type=float, default=None, help="Dirichlet alpha (non-i.i.d. order)")
    p.add_argument("--limit", type=int, default=None, help="images per domain (seeded, class-stratified subset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(BENCH_METHODS),
                   help="methods to run (default: all): " + ", ".join(
                       f"{n} ({b.method.name}{' + ' + b.optimizer.name if b.optimizer else ''})"
                       for n, b in BENCH_METHODS.items()))
    p.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR", help="explicit step sizes (override sweeps)")
    p.add_argument("--sweep-lrs", type=lambda s: [float(v) for v in s.split(",")], default=None, metavar="LR,LR,...",
                   help=f"choose each method's lr on the 4 held-out corruptions of the train split (e.g. "
                        f"{','.join(f'{v:g}' for v in DEFAULT_SWEEP)})")
    p.add_argument("--sweep-from", default=None, help="reuse the lrs chosen by the sweep recorded in this results.json")
    p.add_argument("--val-images", type=int, default=VAL_IMAGES)
    p.add_argument("--mgg-checkpoint", default=None)
    p.add_argument("--source-stats", default=None, help="FOA source statistics (safetensors) for --model")
    p.add_argument("--clean-data", default=None, help="clean images DIR/<class>/<image> for FOA stats and EATA's Fisher")
    p.add_argument("--cache-dir", default=None, help=f"corrupted-image cache (default {DEFAULT_CACHE_DIR})")
    p.add_argument("--device", default="cpu")
    p.add_argument("--title", default=None)
    add_threads_argument(p, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
    return p


def spec_from_args(args: argparse.Namespace):
    from .data.cli import expand_corruptions
    from .data.streams import StreamSpec

    if args.stream:
        text = Path(args.stream).read_text() if args.stream.endswith(".json") and Path(args.stream).is_file() else args.stream
        return StreamSpec.from_json(text)
    return StreamSpec(domains=[(c, args.severity) for c in expand_corruptions(args.corruptions)], order="sequential",
                      batch_size=args.batch_size, reset=args.reset, label_shift=args.label_shift, seed=args.seed,
                      limit=args.limit, data=args.data, split=args.split)


def _run(args: argparse.Namespace) -> int:
    bench(args.out, spec_from_args(args), classifier=args.classifier, model=args.model, weights=args.weights,
          methods=args.methods, lrs=_parse_lrs(args.lr), sweep=args.sweep_lrs, sweep_from=args.sweep_from,
          val_images=args.val_images, mgg_checkpoint=args.mgg_checkpoint, source_stats=args.source_stats,
          clean_data=args.clean_data, num_classes=args.num_classes, cache_dir=args.cache_dir, device=args.device,
          progress=not args.no_progress, quiet=args.quiet, title=args.title)
    return 0
