"""Bench runner: the bench's method list (derived from the method and optimizer registries), engine building,
streaming a method over the domains with a per-(method, domain) result cache, the held-out lr sweep and the job
itself (:class:`BenchConfig` -> :func:`run_bench`)."""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..assets import (
    DEFAULT_MGG_CHECKPOINTS,
    clean_train_batches,
    default_mgg_checkpoint,
    mgg_checkpoint_for,
    mgg_loss_kwargs,
    source_stats_for,
    stats_path_for,
)
from ..classifier import LoadedClassifier, file_sha256
from ..data.corruptions import HELDOUT_CORRUPTIONS, PROFILES, check_profile
from ..data.imagenet_c import ImageNetC, is_domain_tree
from ..data.streams import StreamSpec, default_stream_spec
from ..engine import AdaptationEngine, EngineConfig, compute_fisher
from ..features import compute_source_stats, load_stats
from ..io import atomic_write_text
from ..methods import METHODS, Method
from ..optim import MGG, OPTIMIZERS, OptimInfo
from ..params import batchnorm_layers
from ..progress import log_line, progress_bar
from ..registry import Registry
from .data import (
    DEFAULT_CACHE_DIR,
    FISHER_IMAGES,
    VAL_IMAGES,
    PreparedDomain,
    _clean_batches_from_folder,
    _fingerprint,
    _train_size,
    card_data,
    clean_data_for,
    load_any_classifier,
    stream_domains,
    synthetic_domains,
    validation_indices,
)
from .report import BenchRun, _log, write_report

__all__ = ["ALL_METHODS", "BENCH_METHODS", "DEFAULT_METHODS", "DEFAULT_SWEEP", "METHOD_PARTS", "REFERENCE_LR",
           "BenchConfig", "BenchMethod", "DomainResult", "ResultCache", "Setup", "bench", "bench_spec", "build_engine",
           "remove_if_empty", "run_bench", "run_domain", "run_stream", "sweep_lrs"]

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


@dataclass
class Setup:
    """Everything a method run needs besides its own name and lr."""

    classifier: LoadedClassifier
    source_stats: dict | None = None
    fisher: torch.Tensor | None = None
    mgg_checkpoint: str | None = None
    device: str = "cpu"
    engine: dict = field(default_factory=dict)     # EngineConfig overrides (bn_stats, bn_momentum, update_images)


def has_batchnorm(model) -> bool:
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
    knobs = dict(setup.engine)
    if entry.method.bn_stats == "source":              # methods that keep the source's statistics keep them
        knobs.pop("bn_stats", None)
    cfg = EngineConfig(method=entry.method.name, optimizer=opt.name if opt else None, lr=lr,
                       method_kwargs=dict(method_kwargs or {}),
                       mgg_checkpoint=setup.mgg_checkpoint if needs_ckpt else None, device=setup.device, **knobs)
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
               cache: ResultCache | None = None, method: str = "",
               on_domain: Callable | None = None) -> list[DomainResult]:
    """One method over the stream; ``reset``: "domain" (reset at every domain boundary) or "never" (continual)."""
    if reset not in ("domain", "never"):
        raise ValueError(f"reset must be 'domain' or 'never', not {reset!r}")
    state = engine.new_state(seed=seed)
    results: list[DomainResult] = []
    for i, d in enumerate(domains):
        cached = cache.get(method, i, d.domain.name) if cache is not None else None
        if cache is not None and cached is not None:
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



def sweep_lrs(setup: Setup, methods: Sequence[str], grid: Sequence[float], domains: Sequence[PreparedDomain],
              batch_size: int, cache_root: Path, base_protocol: dict, seed: int = 0, progress: bool = True,
              quiet: bool = False, reset: str = "domain") -> dict:
    """Every gradient method over the same lr grid on held-out domains, streamed with the test stream's reset
    policy (``reset``: "domain" or "never"); the best mean held-out accuracy wins."""
    grad_methods = [m for m in methods if BENCH_METHODS.get(m).optimizer is not None]
    keys = {f"{m}@{lr:g}": _fingerprint(dict(base_protocol, method=m, lr=lr, kind="sweep", reset=reset))
            for m in grad_methods
            for lr in grid}
    cache = ResultCache(cache_root, keys)
    table: dict[str, dict[str, float]] = {}
    bar = progress_bar(len(keys) * len(domains), "held-out lr sweep", enabled=progress)
    for m in grad_methods:
        table[m] = {}
        for lr in grid:
            key = f"{m}@{lr:g}"
            eng = build_engine(setup, m, lr)
            res = run_stream(eng, domains, batch_size, reset=reset, seed=seed, cache=cache, method=key,
                             on_domain=lambda r: bar.update(1))
            table[m][f"{lr:g}"] = float(np.mean([r.accuracy for r in res]))
            log_line(f"  sweep {m} lr {lr:g}: held-out mean {table[m][f'{lr:g}']:.1f}%", quiet)
    bar.close()
    chosen = {m: float(max(table[m], key=lambda k: table[m][k])) for m in grad_methods}
    for m in grad_methods:
        _log(f"  sweep {m}: " + "  ".join(f"{k}:{v:.1f}" for k, v in table[m].items()) + f"  -> {chosen[m]:g}", quiet)
    return {"grid": [float(g) for g in grid], "held_out_mean_accuracy": table, "chosen": chosen}


# ============================================================================================== the job
def _float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


#: the engine knobs of the library defaults (EngineConfig): no "engine" entry in the protocol for these
LIBRARY_ENGINE = {"bn_momentum": 0.1, "update_images": 1}


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _parse_lrs(items: Sequence[str] | None) -> dict[str, float]:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        if not v or k not in METHOD_PARTS:
            raise ValueError(f"--lr takes METHOD=VALUE with METHOD in {list(METHOD_PARTS)}, got {it!r}")
        out[k] = float(v)
    return out


def _arg(help: str, **kw) -> dict:
    """Field metadata the CLI reads (``mgg_core.cli.add_config_arguments``): each parameter is written once."""
    return dict(kw, help=help)


@dataclass(frozen=True)
class BenchConfig:
    """One ``mgg bench`` job. The stream is a :class:`~mgg_core.data.streams.StreamSpec` (None: the MNIST-5k-C test
    stream); every other field is a flag of ``mgg bench`` (built from the metadata below)."""

    out: str | os.PathLike = field(metadata=_arg(
        "output folder (results.json, results.md, online_accuracy.png, cache/)", required=True))
    spec: StreamSpec | None = None
    classifier: str | None = field(default="vit", metadata=_arg(
        "'vit', 'resnet' (bundled) or a classifier .safetensors"))
    model: str | None = field(default=None, metadata=_arg("timm model name for a plain weights file (ImageNet-C)"))
    weights: str | None = field(default=None, metadata=_arg("local weights file for --model"))
    num_classes: int = field(default=1000, metadata=_arg("classes of --model", type=int))
    methods: Sequence[str] = field(default=DEFAULT_METHODS, metadata=_arg(
        "methods to run (default: all): " + ", ".join(
            f"{n} ({b.method.name}{' + ' + b.optimizer.name if b.optimizer else ''})"
            for n, b in BENCH_METHODS.items()),
        nargs="+", choices=list(BENCH_METHODS)))
    lrs: Mapping[str, float] | None = field(default=None, metadata=_arg(
        "explicit step sizes (override sweeps)", flag="--lr", nargs="*", metavar="METHOD=LR", parse=_parse_lrs))
    sweep: Sequence[float] | None = field(default=None, metadata=_arg(
        "choose each method's lr on held-out data over this grid (e.g. "
        f"{','.join(f'{v:g}' for v in DEFAULT_SWEEP)}): --sweep-data, else the 4 held-out corruptions of a "
        "validation subset of the clean TRAIN split (of --data, its make-c manifest or the classifier card)",
        flag="--sweep-lrs", type=_float_list, metavar="LR,LR,..."))
    sweep_data: str | None = field(default=None, metadata=_arg(
        "held-out domains for --sweep-lrs: a tree DIR/<domain>/[<severity>/]<class>/<image> of shifts that are not "
        "in the test stream (every domain of it, at the stream's severity where it has severities)"))
    sweep_from: str | None = field(default=None, metadata=_arg(
        "reuse the lrs chosen by the sweep recorded in this results.json"))
    val_images: int = field(default=VAL_IMAGES, metadata=_arg(
        "held-out validation images of the train split (sweeps)", type=int))
    heldout_profiles: Sequence[str] | None = field(default=None, metadata=_arg(
        "corruption profiles of the held-out sweep domains (default: the stream's profile; several: the 4 held-out "
        "corruptions under each)", nargs="+", choices=list(PROFILES)))
    mgg_checkpoint: str | None = field(default=None, metadata=_arg(
        "MGG checkpoint (default: the bundled one pretrained for the classifier)"))
    source_stats: str | None = field(default=None, metadata=_arg("FOA source statistics (safetensors) for --model"))
    clean_data: str | None = field(default=None, metadata=_arg(
        "clean images DIR/<class>/<image> for FOA stats and EATA's Fisher"))
    cache_dir: str | os.PathLike | None = field(default=None, metadata=_arg(
        f"corrupted-image cache (default {DEFAULT_CACHE_DIR})"))
    device: str = field(default="cpu", metadata=_arg("torch device"))
    bn_stats: str | None = field(default=None, metadata=_arg(
        "BatchNorm statistics of adapting methods: 'batch' (each batch's), 'ema' (per-stream moving average over "
        "images, any batch size), 'source' (default: the method's, 'batch')", choices=["batch", "ema", "source"]))
    bn_momentum: float = field(default=0.1, metadata=_arg("per-image momentum of --bn-stats ema", type=float))
    update_images: int = field(default=1, metadata=_arg(
        "accumulate gradients over batches until this many images, then update (1: every batch)", type=int))
    batch_sizes: Sequence[int] | None = field(default=None, metadata=_arg(
        "batch-size sweep: run the bench once per size over the same images (OUT/batch_<B>/) and write "
        "OUT/batch_size_sweep.json and .md", type=_int_list, metavar="B,B,..."))
    title: str | None = field(default=None, metadata=_arg("table and plot title (default: from the protocol)"))
    progress: bool = field(default=True, metadata=_arg("no progress bars", flag="--no-progress",
                                                       action="store_false"))
    quiet: bool = field(default=False, metadata=_arg("no log lines", action="store_true"))

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        for m in self.methods:
            BENCH_METHODS.get(m)                         # unknown names raise, listing the known ones
        if self.sweep is not None:
            object.__setattr__(self, "sweep", tuple(float(v) for v in self.sweep))
        if self.heldout_profiles is not None:
            object.__setattr__(self, "heldout_profiles", tuple(check_profile(p) for p in self.heldout_profiles))
        if self.val_images < 1:
            raise ValueError(f"val_images must be >= 1, not {self.val_images}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, not {self.num_classes}")
        if self.sweep_data is not None and not is_domain_tree(self.sweep_data):
            raise ValueError(f"--sweep-data {self.sweep_data}: not a tree of domain folders "
                             "DIR/<domain>/[<severity>/]<class>/<image>")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(out=str(self.out), spec=self.spec.to_dict() if self.spec is not None else None,
                 methods=list(self.methods), lrs=dict(self.lrs) if self.lrs else None,
                 sweep=list(self.sweep) if self.sweep is not None else None,
                 heldout_profiles=list(self.heldout_profiles) if self.heldout_profiles else None,
                 batch_sizes=list(self.batch_sizes) if self.batch_sizes is not None else None,
                 cache_dir=str(self.cache_dir) if self.cache_dir is not None else None)
        return d


def bench(out: str | os.PathLike, spec: StreamSpec | None = None, **kwargs) -> dict:
    """``run_bench(BenchConfig(out=out, spec=spec, **kwargs))`` (the fields of :class:`BenchConfig`)."""
    return run_bench(BenchConfig(out=out, spec=spec, **kwargs))


def _companions(cfg: BenchConfig, spec: StreamSpec, clf, methods: Sequence[str]) -> tuple[Setup, dict]:
    """FOA source statistics, EATA's Fisher and the MGG checkpoint the chosen methods need, with their origins."""
    entries = [BENCH_METHODS.get(m) for m in methods]
    data, weights_path = spec.data, Path(clf.checkpoint_path)
    stats, stats_origin = None, None
    if any(e.method.uses_source_stats for e in entries):
        if cfg.source_stats:
            stats, stats_origin = load_stats(cfg.source_stats), str(cfg.source_stats)
        elif cfg.clean_data:
            eng = AdaptationEngine(clf, EngineConfig(method="foa", optimizer="sgd", device=cfg.device))
            stats = compute_source_stats(eng.source_features, _clean_batches_from_folder(clf, cfg.clean_data, 2000))
            stats_origin = f"computed from 2000 clean images of {cfg.clean_data}"
        else:
            p = stats_path_for(weights_path)
            clean, _ = clean_data_for(data, clf)
            if not p.is_file() and clean is None:
                raise ValueError(f"FOA/MGG need source statistics: no {p.name} beside the classifier and no clean "
                                 "training data found; pass --clean-data DIR/<class>/<image> or --source-stats")
            stats = source_stats_for(clf, data=clean, device=cfg.device)
            stats_origin = str(p.name) if p.is_file() else f"computed from clean {clean} train"
    fisher_method = next((e.method.name for e in entries if e.method.uses_fisher), None)
    fisher, fisher_origin = _fisher(cfg, spec, clf, fisher_method)
    mgg_checkpoint = cfg.mgg_checkpoint
    if any(e.optimizer is not None and e.optimizer.needs_checkpoint for e in entries) and mgg_checkpoint is None:
        found = mgg_checkpoint_for(clf)
        if found is None and cfg.classifier in DEFAULT_MGG_CHECKPOINTS and cfg.model is None:
            found = default_mgg_checkpoint(cfg.classifier)
        if found is None or not Path(found).is_file():
            raise FileNotFoundError("no MGG checkpoint for this classifier: pass --mgg-checkpoint (train one with "
                                    "`mgg pretrain`)")
        mgg_checkpoint = str(found)
    engine: dict[str, object] = {"bn_momentum": cfg.bn_momentum, "update_images": cfg.update_images}
    if cfg.bn_stats is not None:
        engine["bn_stats"] = cfg.bn_stats
    setup = Setup(classifier=clf, source_stats=stats, fisher=fisher, mgg_checkpoint=mgg_checkpoint, device=cfg.device,
                  engine=engine)
    return setup, {"source_stats": stats_origin, "fisher": fisher_origin}


def _fisher(cfg: BenchConfig, spec: StreamSpec, clf, method: str | None) -> tuple[torch.Tensor | None, str | None]:
    if method is None:
        return None, None
    eng = AdaptationEngine(clf, EngineConfig(method=method, optimizer="sgd", device=cfg.device))
    if cfg.clean_data:
        return (compute_fisher(eng, _clean_batches_from_folder(clf, cfg.clean_data, 2000)),
                f"2000 clean images of {cfg.clean_data}")
    clean, how = clean_data_for(spec.data, clf)
    if clean is not None:
        n_train = _train_size(clean)
        vi = validation_indices(n_train, cfg.val_images)
        # outside the sweep's validation subset when enough images remain (the Fisher uses no labels either way)
        exclude = vi if n_train - len(vi) >= 64 else None
        n = min(FISHER_IMAGES, n_train - (len(vi) if exclude is not None else 0))
        batches = clean_train_batches(clf, clean, n, 64, seed=spec.seed + 1, exclude=exclude)
        where = "outside the validation subset" if exclude is not None else "the train split is small: all of it"
        return compute_fisher(eng, batches), f"{n} clean {clean} train images ({where}; from {how})"
    log_line(f"WARNING: {method} runs WITHOUT its Fisher regulariser: {how}; pass --clean-data DIR/<class>/<image> "
             "(clean images of the source distribution)")
    return None, "none (no clean data found or given): EATA runs without its Fisher regulariser"


def _base_protocol(cfg: BenchConfig, spec: StreamSpec, setup: Setup) -> dict:
    clf, stats, fisher = setup.classifier, setup.source_stats, setup.fisher
    return {
        "model": getattr(clf.card, "model_name", cfg.model), "weights_sha256": file_sha256(clf.checkpoint_path),
        "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in clf.preprocessor.data_config.items()},
        "stream": spec.to_dict(),
        "mgg_checkpoint_sha256": file_sha256(setup.mgg_checkpoint) if setup.mgg_checkpoint else None,
        "stats_sha": _fingerprint([v.tolist() for v in stats.values()]) if stats is not None else None,
        "fisher_sha": _fingerprint(fisher.tolist()) if fisher is not None else None,
        # engine knobs only when they differ from the library defaults (keeps older caches valid)
        **({"engine": dict(setup.engine)} if setup.engine not in ({}, LIBRARY_ENGINE) else {}),
    }


def _step_sizes(cfg: BenchConfig, spec: StreamSpec, reset: str, setup: Setup, methods: Sequence[str],
                base_protocol: dict, cache_dir: Path) -> tuple[dict, dict, dict | None]:
    """Step sizes: explicit > held-out sweep (this run or a previous results.json) > reference."""
    chosen = {m: REFERENCE_LR[m] for m in methods if m in REFERENCE_LR}
    lr_source = {m: "reference (ViT-B/16, batch 64)" for m in chosen}
    sweep_record = None
    if cfg.sweep_from:
        prev = json.loads(Path(cfg.sweep_from).read_text())
        sweep_record = dict(prev["protocol"]["lr_sweep"], taken_from=str(cfg.sweep_from))
        for m, v in sweep_record["chosen"].items():
            if m in chosen:
                chosen[m], lr_source[m] = float(v), f"held-out sweep ({cfg.sweep_from})"
    elif cfg.sweep:
        sweep_record = _held_out_sweep(cfg, spec, reset, setup, methods, base_protocol, cache_dir)
        for m, v in sweep_record["chosen"].items():
            chosen[m], lr_source[m] = v, "held-out sweep"
    for m, v in (cfg.lrs or {}).items():
        chosen[m], lr_source[m] = v, "given (--lr)"
    return chosen, lr_source, sweep_record


def _sweep_domains(cfg: BenchConfig, spec: StreamSpec, setup: Setup, cache_dir: Path) -> tuple[list, dict, dict]:
    """The held-out domains of the lr sweep, their protocol record and the fingerprint part: ``--sweep-data`` (a
    tree of the user's held-out shifts) or the 4 held-out corruptions of the validation subset of the clean TRAIN
    split behind the stream's data (its own, its make-c manifest's or the classifier card's)."""
    from ..data.streams import StreamSpec as _Spec
    from .data import stream_domains

    seed = spec.seed
    if cfg.sweep_data is not None:
        tree = ImageNetC(cfg.sweep_data)
        sev = next((d[1] for d in spec.domains if isinstance(d, tuple)), None)
        keys = tree.domains(sev)
        names = {d if isinstance(d, str) else f"{d[0]}-{d[1]}" for d in keys}
        if names & set(spec.domain_names) and Path(cfg.sweep_data).resolve() == Path(spec.data).resolve():
            raise ValueError("--sweep-data must not hold the test domains (step sizes are chosen on held-out data)")
        vspec = _Spec(domains=keys, batch_size=spec.batch_size, reset="per_domain", seed=seed, data=cfg.sweep_data)
        val = [PreparedDomain(d, setup.classifier.preprocessor, order=o)
               for d, o in stream_domains(vspec, cache_dir, progress=cfg.progress)]
        record = {"data": str(cfg.sweep_data), "domains": vspec.domain_names, "images": int(sum(len(d) for d in val))}
        return val, record, {"sweep_data": record["domains"], "sweep_images": record["images"]}
    clean, how = clean_data_for(spec.data, setup.classifier)
    if clean is None:
        raise ValueError(f"--sweep-lrs needs held-out data: {how}; pass --sweep-data DIR (held-out domain folders) "
                         "or --lr METHOD=VALUE")
    test_like = [c for c in HELDOUT_CORRUPTIONS if c in {d[0] for d in spec.domains if isinstance(d, tuple)}]
    if test_like:
        raise ValueError(f"the test stream contains the held-out corruptions {test_like}; pass --sweep-data")
    vi = validation_indices(_train_size(clean), cfg.val_images)
    profiles = list(cfg.heldout_profiles or [spec.profile])
    val = [PreparedDomain(d, setup.classifier.preprocessor, order_seed=seed)
           for p in profiles
           for d in synthetic_domains(clean, "train", HELDOUT_CORRUPTIONS, 5, seed, cache_dir, indices=vi,
                                      progress=cfg.progress, profile=p, tag_profile=len(profiles) > 1)]
    record = {"split": "train", "clean_data": str(clean), "clean_data_from": how, "images": int(len(vi)),
              "corruptions": list(HELDOUT_CORRUPTIONS), "severity": 5, "profiles": profiles}
    return val, record, {"split": "train", "held_out": list(HELDOUT_CORRUPTIONS), "val_images": cfg.val_images,
                         "clean": clean if clean == "mnist5k" else "folder", "profiles": profiles}


def _held_out_sweep(cfg: BenchConfig, spec: StreamSpec, reset: str, setup: Setup, methods: Sequence[str],
                    base_protocol: dict, cache_dir: Path) -> dict:
    assert cfg.sweep is not None
    val, data_record, key = _sweep_domains(cfg, spec, setup, cache_dir)
    record = sweep_lrs(setup, methods, cfg.sweep, val, spec.batch_size, Path(cfg.out) / "cache" / f"sweep-{reset}",
                       dict(base_protocol, stream=None, **key), seed=spec.seed, progress=cfg.progress,
                       quiet=cfg.quiet, reset=reset)
    n = len(val)
    record["data"] = dict(data_record, batch_size=spec.batch_size,
                          reset="per domain" if reset == "domain" else f"never (continual, {n} domains in order)",
                          order=f"seeded permutation per domain (seed {spec.seed})")
    return record


def _run_methods(engines: dict, domains: Sequence[PreparedDomain], spec: StreamSpec, reset: str,
                 base_protocol: dict, out: Path, progress: bool,
                 quiet: bool = False) -> tuple[dict[str, dict], dict[str, list[DomainResult]]]:
    """Each method's engine (built once) over the stream; results cached per (method, domain)."""
    names = [d.domain.name for d in domains]
    desc = {m: eng.describe() for m, eng in engines.items()}
    protocols = {m: _fingerprint(dict(base_protocol, method=m, reset=reset, domains=names, describe=desc[m]))
                 for m in engines}
    cache = ResultCache(out / "cache" / f"reset-{reset}", protocols)
    all_results: dict[str, list[DomainResult]] = {}
    bar = progress_bar(len(engines) * len(domains), "bench", enabled=progress)

    def finished(method: str):
        def on_domain(r: DomainResult) -> None:
            bar.update(1)
            log_line(f"  {method} {r.domain}: {r.accuracy:.1f}% ({len(r.correct)} batches, {r.seconds:.1f}s)", quiet)
        return on_domain

    for m, eng in engines.items():
        bar.set_postfix(method=m)
        all_results[m] = run_stream(eng, domains, spec.batch_size, reset=reset, seed=spec.seed, cache=cache,
                                    method=m, on_domain=finished(m))
        rs = all_results[m]
        log_line(f"{m}: mean {np.mean([r.accuracy for r in rs]):.1f}% over {len(rs)} domains", quiet)
    bar.close()
    return desc, all_results


def bench_spec(cfg: BenchConfig, clf) -> StreamSpec:
    """``cfg.spec``, or the default test stream over the data the classifier was trained on (its card): never
    MNIST-5k for a classifier of other data. Raises ValueError when the card names no data found here."""
    if cfg.spec is not None:
        return cfg.spec
    data = card_data(clf)
    if data is None:
        raise ValueError("the classifier's card names no dataset found on this machine; pass --data (its folder, "
                         "or a tree DIR/<domain>/[<severity>/]<class>/<image>)")
    return default_stream_spec(data=data)


def check_split(spec: StreamSpec, clf) -> None:
    """Refuse to test on a plain folder split differently from the classifier's training split: streams split a
    folder with seed 0, so a classifier trained with ``--split-seed N`` (N != 0) would be tested on its own
    training images."""
    if spec.data == "mnist5k" or not Path(spec.data).is_dir() or is_domain_tree(spec.data):
        return
    split = getattr(clf.card, "split", {}) or {}
    seed = int(split.get("split_seed", 0) or 0)
    trained_on = card_data(clf)
    same = trained_on is not None and Path(trained_on).resolve() == Path(spec.data).resolve()
    is_split_folder = (Path(spec.data) / "train").is_dir() and (Path(spec.data) / "test").is_dir()
    if same and seed != 0 and not is_split_folder:
        raise ValueError(f"the classifier was trained on {spec.data} split with --split-seed {seed}, but streams split "
                         "a folder with seed 0 (test images would overlap its training images); write the split "
                         "out as DIR/train/ + DIR/test/ or make-c the test split with --split-seed")


def remove_if_empty(path: Path) -> None:
    """Remove ``path`` and the folders below it when they hold no file (a failed job leaves no empty folders)."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        path.rmdir()


def run_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark over ``cfg.spec`` (a sequential :class:`~mgg_core.data.streams.StreamSpec`; default: the
    test stream of the classifier card's data); writes OUT/results.json, results.md, online_accuracy.png; returns
    the JSON. A failure leaves no empty OUT behind. With ``cfg.batch_sizes``: one run per size (bench.sweep)."""
    if cfg.batch_sizes:
        from .sweep import run_batch_size_sweep

        return run_batch_size_sweep(cfg, run_bench)
    out = Path(cfg.out)
    created = not out.exists()
    try:
        return _run_bench(cfg, out)
    except BaseException:
        if created:
            remove_if_empty(out)
        raise


def _run_bench(cfg: BenchConfig, out: Path) -> dict:
    t_start = time.perf_counter()
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else DEFAULT_CACHE_DIR
    clf = load_any_classifier(cfg.classifier, cfg.model, cfg.weights, num_classes=cfg.num_classes, device=cfg.device)
    spec = bench_spec(cfg, clf)
    check_split(spec, clf)
    reset = "domain" if spec.reset == "per_domain" else spec.reset
    needs_bn = [n for n, b in BENCH_METHODS.items() if b.method.requires_batchnorm]
    methods = [m for m in cfg.methods if m not in needs_bn or has_batchnorm(clf.model)]
    skipped = [m for m in needs_bn if m not in methods]
    setup, origins = _companions(cfg, spec, clf, methods)

    _log(f"preparing {len(spec.domains)} domains ...", cfg.quiet)
    planned = stream_domains(spec, cache_dir, progress=cfg.progress)
    domains = [PreparedDomain(d, clf.preprocessor, order=o) for d, o in planned]
    base_protocol = _base_protocol(cfg, spec, setup)
    out.mkdir(parents=True, exist_ok=True)
    chosen, lr_source, sweep_record = _step_sizes(cfg, spec, reset, setup, methods, base_protocol, cache_dir)
    engines = {m: build_engine(setup, m, chosen.get(m)) for m in methods}
    desc, all_results = _run_methods(engines, domains, spec, reset, base_protocol, out, cfg.progress, cfg.quiet)
    run = BenchRun(cfg=cfg, spec=spec, reset=reset, setup=setup, domains=domains,
                   description=planned[0][0].description if planned else None, base_protocol=base_protocol,
                   methods={m: {"engine": desc[m], "lr": chosen.get(m), "lr_source": lr_source.get(m)}
                            for m in methods},
                   skipped=skipped, origins=origins, sweep_record=sweep_record, results=all_results,
                   highlight=[n for n, b in BENCH_METHODS.items() if b.optimizer is not None and b.optimizer.highlight])
    return write_report(run, out, t_start)
