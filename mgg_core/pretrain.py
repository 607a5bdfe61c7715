"""`mgg pretrain`: offline meta-training of MGG's gradient memory layer for one source classifier.

    mgg pretrain --classifier vit --out mgg_core/assets/mgg_mnist5k_test_vit.safetensors

Protocol (MGTTA's, see docs/results.md for the values used for the bundled checkpoints):

* data: ``--samples`` (128) unlabeled images drawn once (``--seed``) from the TRAIN split, outside the held-out
  validation subset, each corrupted at severity 5 by one of the 4 held-out corruptions (speckle_noise, spatter,
  gaussian_blur, saturate; 1/4 each); never the 15 test corruptions, never the TEST split; labels unused;
* per epoch the samples are visited in a fresh seeded order in batches of ``--batch-size`` (2). The classifier's
  adapted scalars, MGG's moments and its memory start at source / W0 at every epoch (the reference lets them drift);
* meta-step: raw gradient g_t of the FOA loss (entropy + 0.4 * feature discrepancy / 64 against the clean source
  statistics) at theta_t on batch t; u_t = GML(token(g_t), memory_t); theta_{t+1} = theta_t - alpha_train * u_t;
  meta-loss = the same FOA loss on the NEXT batch at theta_{t+1}; Adam (``--meta-lr`` 1e-2) on the GML weights.
  ``--unroll 1`` (default) is truncation 1: g_t, theta_t and the memory are detached inputs. ``--unroll K`` keeps
  theta and the memory differentiable over K steps and sums the K next-batch losses (gradients stay first order);
* ``--severities`` and ``--profiles`` widen the training set: the samples are spread in equal shares over every
  (held-out corruption, severity, profile) combination; the validation domains are the 4 held-out corruptions at
  ``--severity`` under each of ``--profiles`` (``imagenet-c`` / ``cifar-c`` constants);
* after each epoch: the full online protocol (batch ``--val-batch-size`` 64, reset per corruption, one pass) with
  the candidate MGG at the deployment step ``--val-lr`` on the held-out validation domains of the TRAIN split;
  the best epoch is kept (labels of this held-out validation data only);
* resumable: ``OUT`` stem + ``.pretrain-state.pt`` holds the GML, Adam state, RNG state, history and the best GML
  after every epoch; ``--resume`` continues and gives the same result as an uninterrupted run.

The output is ``OUT`` (GML safetensors via ``GradientMemoryLayer.save``) plus the JSON card beside it.
Bundled checkpoints and FOA statistics are found through :mod:`mgg_core.assets`.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from .assets import source_stats_for, stats_path_for
from .bench import (
    DEFAULT_CACHE_DIR,
    PreparedDomain,
    Setup,
    build_engine,
    corrupted_images,
    run_stream,
    synthetic_domains,
    validation_indices,
)
from .classifier import (
    DEFAULT_CHECKPOINTS,
    LoadedClassifier,
    default_checkpoint,
    file_sha256,
    library_versions,
    load_classifier,
)
from .cli import add_config_arguments, add_threads_argument, config_kwargs
from .data.corruptions import DEFAULT_PROFILE, HELDOUT_CORRUPTIONS, PROFILES, SEVERITIES, check_profile
from .data.sources import open_source
from .engine import AdaptationEngine, EngineConfig
from .io import atomic_path
from .methods.foa import FOALoss
from .mgg import GradientMemoryLayer, num_meta_parameters
from .optim import MGG
from .reasons import ResetPolicy


# ============================================================================================== meta-training
def _foa_loss(engine, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The engine's FOA loss at ``theta`` on ``x`` (the meta-objective)."""
    logits, feats = engine._forward(theta, x, True)
    return engine.method.loss(logits, feats, engine.source_stats)


def pretraining_samples(n_train: int, samples: int, seed: int, val_idx: np.ndarray,
                        severities: Sequence[int] = (5,), profiles: Sequence[str] = (DEFAULT_PROFILE,),
                        ) -> list[tuple[int, tuple[str, int, str]]]:
    """(train index, (held-out corruption, severity, profile)) pairs: ``samples`` indices outside the validation
    subset, the (corruption, severity, profile) combinations assigned in equal shares, drawn once by ``seed`` (one
    severity and profile: the same pairs as before the options existed)."""
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    pool = np.setdiff1d(np.arange(n_train), val_idx)
    idx = rng.choice(pool, size=min(samples, len(pool)), replace=False)
    combos = [(c, int(s), p) for c in HELDOUT_CORRUPTIONS for s in severities for p in profiles]
    corr = [combos[i % len(combos)] for i in range(len(idx))]
    rng.shuffle(corr)
    return [(int(i), c) for i, c in zip(idx, corr, strict=True)]


def load_pretraining_data(classifier, cfg: PretrainConfig, cache_dir) -> tuple[torch.Tensor, list]:
    if cfg.data is None:
        raise ValueError("pretraining data not resolved: call resolve_data(cfg) first")
    src = open_source(cfg.data, "train")
    val_idx = validation_indices(len(src), cfg.val_images)
    pairs = pretraining_samples(len(src), cfg.samples, cfg.seed, val_idx, cfg.train_severities, cfg.profiles)
    sid = f"{cfg.data}-train" if cfg.data == "mnist5k" else None
    by_key: dict[tuple[int, tuple[str, int, str]], np.ndarray] = {}
    for combo in sorted(set(c for _, c in pairs)):
        idx = np.asarray([i for i, cc in pairs if cc == combo], dtype=np.int64)
        c, sev, prof = combo
        arr = corrupted_images(src, idx, c, sev, cfg.seed, cache_dir if sid else None, sid or "folder",
                               profile=prof)
        by_key.update({(i, combo): a for i, a in zip(idx.tolist(), arr, strict=True)})
    return classifier.preprocessor(np.stack([by_key[(i, c)] for i, c in pairs])), pairs


def validate(setup: Setup, gml: GradientMemoryLayer, domains, lr: float, batch_size: int,
             lam: float = 0.4) -> tuple[float, dict]:
    """Mean accuracy of the full online protocol (reset per domain) with this GML on held-out domains."""
    eng = build_engine(setup, "mgg", lr, method_kwargs={"lam": lam}, gml=copy.deepcopy(gml).eval())
    res = run_stream(eng, domains, batch_size, reset=ResetPolicy.PER_DOMAIN.results_name)
    per = {r.domain: r.accuracy for r in res}
    return float(np.mean(list(per.values()))), per


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def state_path_for(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".pretrain-state.pt")


def _arg(help: str, **kw) -> dict:
    """Field metadata the CLI reads (``mgg_core.cli.add_config_arguments``): each parameter is written once."""
    return dict(kw, help=help)


@dataclass(frozen=True)
class PretrainConfig:
    """One ``mgg pretrain`` job (the protocol in the module docstring); flags are built from the field metadata."""

    out: str | os.PathLike = field(default="mgg.safetensors", metadata=_arg(
        "output GML checkpoint (.safetensors); card goes beside it (.json)", required=True))
    classifier: str = field(default="vit", metadata=_arg("'vit', 'resnet' (bundled) or a classifier .safetensors"))
    data: str | None = field(default=None, metadata=_arg(
        "the classifier's clean labelled data ('mnist5k', a folder DIR/<class>/<image>, or a make-c tree whose "
        "manifest names it); default: the data named by the classifier's card"))
    samples: int = field(default=128, metadata=_arg("corrupted TRAIN images to meta-train on", type=int))
    batch_size: int = field(default=2, metadata=_arg("meta-training batch", type=int))
    epochs: int = field(default=40, metadata=_arg("epochs", type=int))
    meta_lr: float = field(default=1e-2, metadata=_arg("Adam lr on the GML weights", type=float))
    alpha_train: float = field(default=1e-4, metadata=_arg("inner step during meta-training", type=float))
    val_lr: float = field(default=1e-3, metadata=_arg("deployment step used for validation", type=float))
    unroll: int = field(default=1, metadata=_arg("meta-gradient truncation length", type=int))
    seed: int = field(default=0, metadata=_arg("sample, order and GML seed", type=int))
    severity: int = field(default=5, metadata=_arg("corruption severity (validation; training too unless "
                                                   "--severities)", type=int))
    severities: Sequence[int] | None = field(default=None, metadata=_arg(
        "severities of the meta-training samples (default: --severity)", type=int, nargs="+"))
    profiles: Sequence[str] = field(default=(DEFAULT_PROFILE,), metadata=_arg(
        "corruption profiles of the meta-training samples and of the validation domains", nargs="+",
        choices=list(PROFILES)))
    val_images: int = field(default=1000, metadata=_arg("held-out validation images of the train split", type=int))
    val_batch_size: int = field(default=64, metadata=_arg("batch size of the validation protocol (deployment's)",
                                                          type=int))
    hidden: int = field(default=8, metadata=_arg("GML hidden width", type=int))
    lam: float = field(default=0.4, metadata=_arg(
        "weight of FOA's feature-discrepancy term in the loss (0: entropy only, TENT's loss)", type=float))
    init: str | None = field(default=None, metadata=_arg("start from this GML checkpoint instead of a fresh one"))
    resume: bool = field(default=False, metadata=_arg("continue from OUT's .pretrain-state.pt", action="store_true"))
    write_stats: bool = field(default=False, metadata=_arg(
        "also write the classifier's FOA source statistics beside its checkpoint if absent", action="store_true"))
    cache_dir: str | os.PathLike | None = field(default=None, metadata=_arg("corrupted-image cache"))
    device: str = field(default="cpu", metadata=_arg("torch device"))
    progress: bool = field(default=True, metadata=_arg("no progress bars", flag="--no-progress",
                                                       action="store_false"))
    quiet: bool = field(default=False, metadata=_arg("no log lines", action="store_true"))
    max_steps_per_epoch: int | None = None
    keep_state: bool = True
    extra_card: dict | None = None

    def __post_init__(self) -> None:
        if self.unroll < 1:
            raise ValueError("unroll must be >= 1")
        object.__setattr__(self, "profiles", tuple(check_profile(p) for p in self.profiles))
        if not self.profiles:
            raise ValueError("profiles must name at least one corruption profile")
        if self.severities is not None:
            object.__setattr__(self, "severities", tuple(int(s) for s in self.severities))
        for sev in self.train_severities + (self.severity,):
            if sev not in SEVERITIES:
                raise ValueError(f"severities must be in 1..5, not {sev}")
        for name in ("samples", "batch_size", "epochs", "val_images", "val_batch_size", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")

    @property
    def train_severities(self) -> tuple[int, ...]:
        return tuple(self.severities) if self.severities else (self.severity,)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(out=str(self.out), cache_dir=str(self.cache_dir) if self.cache_dir is not None else None,
                 profiles=list(self.profiles), severities=list(self.severities) if self.severities else None)
        return d


def pretrain(**kwargs) -> dict:
    """``run_pretrain(PretrainConfig(**kwargs))`` (the fields of :class:`PretrainConfig`); returns the card."""
    return run_pretrain(PretrainConfig(**kwargs))


@dataclass
class _Problem:
    """What meta-training works on: the classifier, its FOA engine, the training samples, the validation domains."""

    ckpt_path: Path
    clf: LoadedClassifier
    stats: dict
    engine: AdaptationEngine
    x_all: torch.Tensor
    pairs: list[tuple[int, tuple[str, int, str]]]
    val_idx: np.ndarray
    val_domains: list[PreparedDomain]
    setup: Setup


def _problem(cfg: PretrainConfig) -> _Problem:
    assert cfg.data is not None, "run_pretrain resolves the data first (resolve_data)"
    cache_dir = DEFAULT_CACHE_DIR if cfg.cache_dir is None else cfg.cache_dir
    bundled = cfg.classifier in DEFAULT_CHECKPOINTS
    ckpt_path = Path(default_checkpoint(cfg.classifier)) if bundled else Path(cfg.classifier)
    clf = load_classifier(ckpt_path, device=cfg.device)
    stats = source_stats_for(clf, data=cfg.data, device=cfg.device)
    engine = AdaptationEngine(clf, EngineConfig(method="foa", optimizer="sgd", method_kwargs={"lam": cfg.lam},
                                                device=cfg.device), source_stats=stats)
    x_all, pairs = load_pretraining_data(clf, cfg, cache_dir)
    val_idx = validation_indices(len(open_source(cfg.data, "train")), cfg.val_images)
    val_domains = [PreparedDomain(d, clf.preprocessor, order_seed=cfg.seed)
                   for p in cfg.profiles
                   for d in synthetic_domains(cfg.data, "train", HELDOUT_CORRUPTIONS, cfg.severity, cfg.seed,
                                              cache_dir, indices=val_idx, profile=p,
                                              tag_profile=len(cfg.profiles) > 1)]
    return _Problem(ckpt_path, clf, stats, engine, x_all.to(engine.device), pairs, val_idx, val_domains,
                    Setup(classifier=clf, source_stats=stats, device=cfg.device))


@dataclass
class _Training:
    """The meta-training state that an epoch advances and the state file keeps."""

    gml: GradientMemoryLayer
    adam: torch.optim.Adam
    history: list[dict]
    best: dict
    start_epoch: int = 1
    seconds_before: float = 0.0                   # time spent in earlier (interrupted) invocations


def _start_training(cfg: PretrainConfig, prob: _Problem, state_file: Path) -> _Training:
    torch.manual_seed(cfg.seed)
    gml = GradientMemoryLayer.load(cfg.init) if cfg.init else GradientMemoryLayer(hidden=cfg.hidden, seed=cfg.seed)
    gml = gml.to(prob.engine.device)
    gml.requires_grad_(True)
    tr = _Training(gml, torch.optim.Adam(gml.parameters(), lr=cfg.meta_lr), [],
                   {"epoch": 0, "val_accuracy": None, "state_dict": copy.deepcopy(gml.state_dict())})
    if cfg.resume and state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        gml.load_state_dict(st["gml"])
        tr.adam.load_state_dict(st["adam"])
        _set_rng_state(st["rng"])
        tr.history, tr.best, tr.start_epoch = st["history"], st["best"], st["epoch"] + 1
        tr.seconds_before = float(st.get("seconds", 0.0))
        _log(f"resumed from {state_file} after epoch {st['epoch']}", cfg.quiet)
    if tr.start_epoch == 1:
        acc0, per0 = validate(prob.setup, gml, prob.val_domains, cfg.val_lr, cfg.val_batch_size, cfg.lam)
        tr.best = {"epoch": 0, "val_accuracy": acc0, "per_domain": per0,
                   "state_dict": copy.deepcopy(gml.state_dict())}
        tr.history.append({"epoch": 0, "val_accuracy": acc0, "per_domain": per0})
        _log(f"epoch 0 (initial GML): held-out val acc {acc0:.2f}", cfg.quiet)
    return tr


def _meta_epoch(cfg: PretrainConfig, prob: _Problem, tr: _Training, opt_helper: MGG, epoch: int,
                steps_per_epoch: int) -> tuple[list[float], float]:
    """One epoch of meta-steps (see the module docstring); returns (next-batch losses, summed meta-grad norms)."""
    engine, x_all, bs, n = prob.engine, prob.x_all, cfg.batch_size, prob.x_all.shape[0]
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    order = torch.randperm(n, generator=gen)
    batches = [x_all[order[i * bs:(i + 1) * bs]] for i in range(n // bs)]
    theta = engine.theta0.clone()                        # classifier restored to source every epoch
    ostate = opt_helper.init_state(theta, memory_in_graph=True)  # fresh moments, memory = current W0, b0
    th = theta.clone().requires_grad_(True)              # gradient at theta on the first batch
    (g,) = torch.autograd.grad(_foa_loss(engine, th, batches[0]), th)
    meta_losses: list[float] = []
    grad_norm_sum = 0.0
    window: list[tuple[torch.Tensor, torch.Tensor]] = []
    bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress, leave=False,
               dynamic_ncols=True)
    for t in bar:
        u, new_state = opt_helper.direction(g.detach(), ostate, detach_memory=False)
        theta_new = theta - cfg.alpha_train * u          # differentiable in phi (and in theta within a window)
        leaf = theta_new.detach().requires_grad_(True)
        next_loss = _foa_loss(engine, leaf, batches[t + 1])
        (g_next,) = torch.autograd.grad(next_loss, leaf)  # d(meta-loss)/d(theta_{t+1}) = next raw gradient
        window.append((theta_new, g_next))
        meta_losses.append(float(next_loss.detach()))
        if len(window) == cfg.unroll or t == steps_per_epoch - 1:
            # sum of the window's next-batch losses; first-order in theta: each loss contributes its gradient
            torch.autograd.backward([tn for tn, _ in window], [gn for _, gn in window])
            sq = sum(((p.grad ** 2).sum() for p in tr.gml.parameters() if p.grad is not None), torch.zeros(()))
            grad_norm_sum += float(torch.sqrt(sq))
            tr.adam.step()
            tr.adam.zero_grad(set_to_none=True)
            window = []
            theta = theta_new.detach()
            ostate = {k: v.detach() for k, v in new_state.items()}
        else:
            theta = theta_new                            # keep the graph inside the unroll window
            ostate = new_state
        g = g_next
        bar.set_postfix(meta_loss=f"{np.mean(meta_losses[-16:]):.4f}")
    bar.close()
    return meta_losses, grad_norm_sum


def resolve_data(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with ``data`` set to clean labelled data with a TRAIN split: the given data (a make-c tree stands for
    the source in its manifest) or, when None, the classifier card's; never a silent MNIST-5k for a classifier of
    other data. Raises ValueError with what to pass instead."""
    from .bench.data import card_data, clean_data_for
    from .classifier import ClassifierCard, card_path_for

    ck = Path(default_checkpoint(cfg.classifier) if cfg.classifier in DEFAULT_CHECKPOINTS else cfg.classifier)
    if not ck.is_file():
        raise FileNotFoundError(f"classifier checkpoint {ck} not found")
    clf = SimpleNamespace(card=ClassifierCard.load(card_path_for(ck)), checkpoint_path=ck)
    if cfg.data is None:
        data = card_data(clf)
        if data is None:
            raise ValueError(f"the card of {ck} names no dataset found on this machine; pass --data (the clean "
                             "training data of the classifier)")
    else:
        if cfg.data != "mnist5k" and not Path(cfg.data).is_dir():
            raise FileNotFoundError(f"--data {cfg.data}: no such folder (and not 'mnist5k')")
        data, how = clean_data_for(cfg.data, None)
        if data is None:
            raise ValueError(f"--data {cfg.data}: a tree of domain folders; pretrain needs the clean labelled data "
                             f"DIR/<class>/<image> ({how})")
    n_train = len(open_source(str(data), "train"))
    if n_train - min(cfg.val_images, n_train) < 2 * cfg.batch_size:
        raise ValueError(f"{data} has {n_train} training images and --val-images {cfg.val_images} holds them back "
                         "for validation, leaving too few to meta-train on; lower --val-images")
    return dataclasses.replace(cfg, data=str(data))


def run_pretrain(cfg: PretrainConfig) -> dict:
    """Meta-train a GML for ``cfg.classifier`` ("vit" / "resnet" / a checkpoint path); returns the card."""
    t_start = time.perf_counter()
    cfg = resolve_data(cfg)
    out = Path(cfg.out)
    prob = _problem(cfg)
    state_file = state_path_for(out)
    tr = _start_training(cfg, prob, state_file)
    opt_helper = MGG(tr.gml, lr=cfg.alpha_train)         # tokens (moments) exactly as deployed
    tr.gml.requires_grad_(True)
    n = prob.x_all.shape[0]
    steps_per_epoch = n // cfg.batch_size - 1
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{n} samples at batch {cfg.batch_size} give no (batch, next batch) pair")
    for epoch in range(tr.start_epoch, cfg.epochs + 1):
        t0 = time.perf_counter()
        meta_losses, grad_norm_sum = _meta_epoch(cfg, prob, tr, opt_helper, epoch, steps_per_epoch)
        acc, per = validate(prob.setup, tr.gml, prob.val_domains, cfg.val_lr, cfg.val_batch_size, cfg.lam)
        rec = {"epoch": epoch, "meta_loss": float(np.mean(meta_losses)), "val_accuracy": acc, "per_domain": per,
               "meta_grad_norm": grad_norm_sum, "seconds": time.perf_counter() - t0}
        tr.history.append(rec)
        if tr.best["val_accuracy"] is None or acc > tr.best["val_accuracy"]:
            tr.best = {"epoch": epoch, "val_accuracy": acc, "per_domain": per,
                       "state_dict": copy.deepcopy(tr.gml.state_dict())}
        _log(f"epoch {epoch}: meta-loss {rec['meta_loss']:.4f}  held-out val acc {acc:.2f}  "
             f"(best {tr.best['val_accuracy']:.2f} @ {tr.best['epoch']})", cfg.quiet)
        with atomic_path(state_file) as tmp:
            torch.save({"gml": tr.gml.state_dict(), "adam": tr.adam.state_dict(), "rng": _rng_state(),
                        "history": tr.history, "best": tr.best, "epoch": epoch,
                        "seconds": tr.seconds_before + time.perf_counter() - t_start}, tmp)
    final = GradientMemoryLayer(hidden=tr.gml.hidden, token_dim=tr.gml.token_dim, seed=None)
    final.load_state_dict(tr.best["state_dict"])
    card = _card(cfg, prob, tr, final, time.perf_counter() - t_start)
    final.save(out, card=card)
    if not cfg.keep_state and state_file.is_file():
        state_file.unlink()
    _log(f"wrote {out} (best epoch {tr.best['epoch']}, held-out val acc {tr.best['val_accuracy']:.2f})", cfg.quiet)
    return card


def _card(cfg: PretrainConfig, prob: _Problem, tr: _Training, final: GradientMemoryLayer, seconds: float) -> dict:
    """The JSON card of the written checkpoint (protocol, data, training, history, deployment, versions)."""
    method = prob.engine.method
    assert isinstance(method, FOALoss)
    card = {
        "kind": "mgg-gml",
        "meta_parameters": num_meta_parameters(final),
        "classifier": {"checkpoint": prob.ckpt_path.name, "model": prob.clf.card.model_name,
                       "sha256": file_sha256(prob.ckpt_path), "adapted_scalars": prob.engine.spec.numel},
        "loss": {"name": "foa", "lambda": method.lam, "divisor": method.divisor,
                 "source_stats": stats_path_for(prob.ckpt_path).name,
                 "source_stats_data": f"{cfg.data} train, clean"},
        "data": {"source": cfg.data, "split": "train", "samples": len(prob.pairs),
                 "corruptions": list(HELDOUT_CORRUPTIONS), "severity": cfg.severity,
                 "severities": list(cfg.train_severities), "profiles": list(cfg.profiles), "sample_seed": cfg.seed,
                 "sample_rule": "drawn once from the TRAIN split outside the validation subset, corruptions in "
                                "equal shares",
                 "validation": {"split": "train", "images": int(len(prob.val_idx)),
                                "corruptions": list(HELDOUT_CORRUPTIONS), "severity": cfg.severity,
                                "profiles": list(cfg.profiles), "batch_size": cfg.val_batch_size,
                                "reset": "per corruption", "lr": cfg.val_lr}},
        "training": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "meta_optimizer": "adam",
                     "meta_lr": cfg.meta_lr, "alpha_train": cfg.alpha_train, "unroll": cfg.unroll,
                     "truncation": cfg.unroll,
                     "meta_objective": "FOA loss on the next batch after the MGG update",
                     "classifier_reset": "norm parameters, moments and memory restored to source every epoch",
                     "seed": cfg.seed, "init": cfg.init, "hidden": tr.gml.hidden,
                     "seconds": round(tr.seconds_before + seconds, 1),
                     "invocations_resumed": int(cfg.resume and tr.seconds_before > 0)},
        "best_epoch": tr.best["epoch"], "best_val_accuracy": tr.best["val_accuracy"],
        "best_val_per_domain": tr.best.get("per_domain"),
        "history": [{k: v for k, v in h.items() if k != "per_domain"} for h in tr.history],
        "deployment": {"optimizer": "mgg", "method": "foa", "lr": cfg.val_lr},
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.extra_card:
        card.update(cfg.extra_card)
    return card


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


# ============================================================================================== CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pretrain", help="meta-train MGG (gradient memory layer) for a source classifier",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, PretrainConfig)
    p.set_defaults(device="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_argument(p, default=1)
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    """The CLI job: the user's errors are one line on stderr and leave no empty output folder."""
    from .bench.cli import user_errors
    from .bench.runner import remove_if_empty

    out_dir = Path(args.out).parent
    created = not out_dir.exists()

    def job() -> int:
        cfg = resolve_data(PretrainConfig(**config_kwargs(PretrainConfig, args)))
        if not sys.stderr.isatty():       # no carriage-return bar in a log: the per-epoch lines say where it is
            cfg = dataclasses.replace(cfg, progress=False)
        if cfg.write_stats:
            ck = default_checkpoint(cfg.classifier) if cfg.classifier in DEFAULT_CHECKPOINTS else cfg.classifier
            source_stats_for(load_classifier(ck), data=cfg.data, write=True)
        run_pretrain(cfg)
        return 0
    try:
        return user_errors("pretrain", job)
    except BaseException:
        if created:
            remove_if_empty(out_dir)
        raise
