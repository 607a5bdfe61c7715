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
* after each epoch: the full online protocol (batch 64, reset per corruption, one pass) with the candidate MGG at
  the deployment step ``--val-lr`` on the 4 held-out corruptions of the validation subset of the TRAIN split;
  the best epoch is kept (labels of this held-out validation data only);
* resumable: ``OUT`` stem + ``.pretrain-state.pt`` holds the GML, Adam state, RNG state, history and the best GML
  after every epoch; ``--resume`` continues and gives the same result as an uninterrupted run.

The output is ``OUT`` (GML safetensors via ``GradientMemoryLayer.save``) plus the JSON card beside it.
Bundled checkpoints and FOA statistics are found through :mod:`mgg_core.assets`.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import time
from pathlib import Path

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
from .classifier import default_checkpoint, file_sha256, library_versions, load_classifier
from .cli import add_threads_argument
from .data.corruptions import HELDOUT_CORRUPTIONS
from .data.sources import open_source
from .engine import AdaptationEngine, EngineConfig
from .io import atomic_path
from .mgg import GradientMemoryLayer, num_meta_parameters
from .optim import MGG

DEFAULTS = {
    "samples": 128, "batch_size": 2, "epochs": 40, "meta_lr": 1e-2, "alpha_train": 1e-4, "val_lr": 1e-3,
    "unroll": 1, "seed": 0, "severity": 5, "val_images": 1000, "val_batch_size": 64, "hidden": 8,
}


# ============================================================================================== meta-training
def _foa_loss(engine, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The engine's FOA loss at ``theta`` on ``x`` (the meta-objective)."""
    logits, feats = engine._forward(theta, x, True)
    return engine.method.loss(logits, feats, engine.source_stats)


def pretraining_samples(n_train: int, samples: int, seed: int, val_idx: np.ndarray) -> list[tuple[int, str]]:
    """(train index, held-out corruption) pairs: ``samples`` indices outside the validation subset, corruptions
    assigned in equal shares, drawn once by ``seed``."""
    rng = np.random.Generator(np.random.PCG64([seed, 7]))
    pool = np.setdiff1d(np.arange(n_train), val_idx)
    idx = rng.choice(pool, size=min(samples, len(pool)), replace=False)
    corr = [HELDOUT_CORRUPTIONS[i % len(HELDOUT_CORRUPTIONS)] for i in range(len(idx))]
    rng.shuffle(corr)
    return [(int(i), c) for i, c in zip(idx, corr)]


def load_pretraining_data(classifier, data: str, samples: int, seed: int, severity: int, cache_dir,
                          val_images: int) -> tuple[torch.Tensor, list[tuple[int, str]]]:
    src = open_source(data, "train")
    val_idx = validation_indices(len(src), val_images)
    pairs = pretraining_samples(len(src), samples, seed, val_idx)
    sid = f"{data}-train" if data == "mnist5k" else None
    imgs = []
    for c in HELDOUT_CORRUPTIONS:
        idx = np.asarray([i for i, cc in pairs if cc == c], dtype=np.int64)
        if idx.size:
            arr = corrupted_images(src, idx, c, severity, seed, cache_dir if sid else None, sid or "folder")
            imgs.extend(zip(idx.tolist(), [c] * len(idx), arr))
    by_key = {(i, c): a for i, c, a in imgs}
    return classifier.preprocessor(np.stack([by_key[(i, c)] for i, c in pairs])), pairs


def validate(setup, gml: GradientMemoryLayer, domains, lr: float, batch_size: int, lam: float = 0.4) -> tuple[float, dict]:
    """Mean accuracy of the full online protocol (reset per domain) with this GML on held-out domains."""
    eng = build_engine(setup, "mgg", lr, method_kwargs={"lam": lam}, gml=copy.deepcopy(gml).eval())
    res = run_stream(eng, domains, batch_size, reset="domain")
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


def pretrain(classifier: str = "vit", out: str | os.PathLike = "mgg.safetensors", data: str = "mnist5k",
             samples: int = DEFAULTS["samples"], batch_size: int = DEFAULTS["batch_size"],
             epochs: int = DEFAULTS["epochs"], meta_lr: float = DEFAULTS["meta_lr"],
             alpha_train: float = DEFAULTS["alpha_train"], val_lr: float = DEFAULTS["val_lr"],
             unroll: int = DEFAULTS["unroll"], seed: int = DEFAULTS["seed"], severity: int = DEFAULTS["severity"],
             val_images: int = DEFAULTS["val_images"], val_batch_size: int = DEFAULTS["val_batch_size"],
             hidden: int = DEFAULTS["hidden"], init: str | None = None, resume: bool = False, lam: float = 0.4,
             cache_dir=None, device: str = "cpu", progress: bool = True, quiet: bool = False,
             max_steps_per_epoch: int | None = None, keep_state: bool = True, extra_card: dict | None = None) -> dict:
    """Meta-train a GML for ``classifier`` ("vit" / "resnet" / a checkpoint path); returns the card."""
    if unroll < 1:
        raise ValueError("unroll must be >= 1")
    cache_dir = DEFAULT_CACHE_DIR if cache_dir is None else cache_dir
    t_start = time.perf_counter()
    out = Path(out)
    ckpt_path = Path(default_checkpoint(classifier)) if classifier in ("vit", "resnet") else Path(classifier)
    clf = load_classifier(ckpt_path, device=device)
    stats = source_stats_for(clf, data=data, device=device)
    engine = AdaptationEngine(clf, EngineConfig(method="foa", optimizer="sgd", method_kwargs={"lam": lam}, device=device),
                              source_stats=stats)

    x_all, pairs = load_pretraining_data(clf, data, samples, seed, severity, cache_dir, val_images)
    x_all = x_all.to(engine.device)
    n_train = len(open_source(data, "train"))
    val_idx = validation_indices(n_train, val_images)
    val_domains = [PreparedDomain(d, clf.preprocessor, order_seed=seed)
                   for d in synthetic_domains(data, "train", HELDOUT_CORRUPTIONS, severity, seed, cache_dir,
                                              indices=val_idx)]
    setup = Setup(classifier=clf, source_stats=stats, device=device)

    torch.manual_seed(seed)
    gml = GradientMemoryLayer.load(init) if init else GradientMemoryLayer(hidden=hidden, seed=seed)
    gml = gml.to(engine.device)
    opt_helper = MGG(gml, lr=alpha_train)          # tokens (moments) exactly as deployed
    gml.requires_grad_(True)
    adam = torch.optim.Adam(gml.parameters(), lr=meta_lr)
    history: list[dict] = []
    best = {"epoch": 0, "val_accuracy": None, "state_dict": copy.deepcopy(gml.state_dict())}
    start_epoch = 1
    seconds_before = 0.0                                   # time spent in earlier (interrupted) invocations
    state_file = state_path_for(out)
    if resume and state_file.is_file():
        st = torch.load(state_file, weights_only=False)
        gml.load_state_dict(st["gml"])
        adam.load_state_dict(st["adam"])
        _set_rng_state(st["rng"])
        history, best, start_epoch = st["history"], st["best"], st["epoch"] + 1
        seconds_before = float(st.get("seconds", 0.0))
        _log(f"resumed from {state_file} after epoch {st['epoch']}", quiet)
    if start_epoch == 1:
        acc0, per0 = validate(setup, gml, val_domains, val_lr, val_batch_size, lam)
        best = {"epoch": 0, "val_accuracy": acc0, "per_domain": per0, "state_dict": copy.deepcopy(gml.state_dict())}
        history.append({"epoch": 0, "val_accuracy": acc0, "per_domain": per0})
        _log(f"epoch 0 (initial GML): held-out val acc {acc0:.2f}", quiet)

    n = x_all.shape[0]
    n_batches = n // batch_size
    steps_per_epoch = n_batches - 1
    if max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"{n} samples at batch {batch_size} give no (batch, next batch) pair")
    for epoch in range(start_epoch, epochs + 1):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen)
        batches = [x_all[order[i * batch_size:(i + 1) * batch_size]] for i in range(n_batches)]
        theta = engine.theta0.clone()                        # classifier restored to source every epoch
        ostate = opt_helper.init_state(theta, memory_in_graph=True)  # fresh moments, memory = current W0, b0
        # gradient at theta on the first batch
        th = theta.clone().requires_grad_(True)
        loss = _foa_loss(engine, th, batches[0])
        (g,) = torch.autograd.grad(loss, th)
        meta_losses, losses, grad_norm_sum = [], [], 0.0
        window: list[torch.Tensor] = []
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for t in bar:
            u, new_state = opt_helper.direction(g.detach(), ostate, detach_memory=False)
            theta_new = theta - alpha_train * u              # differentiable in phi (and in theta within a window)
            leaf = theta_new.detach().requires_grad_(True)
            next_loss = _foa_loss(engine, leaf, batches[t + 1])
            (g_next,) = torch.autograd.grad(next_loss, leaf)  # d(meta-loss)/d(theta_{t+1}) = next raw gradient
            window.append((theta_new, g_next))
            meta_losses.append(float(next_loss))
            if len(window) == unroll or t == steps_per_epoch - 1:
                # sum of the window's next-batch losses; first-order in theta: each loss contributes its gradient
                torch.autograd.backward([tn for tn, _ in window], [gn for _, gn in window])
                grad_norm_sum += float(torch.sqrt(sum((p.grad ** 2).sum() for p in gml.parameters() if p.grad is not None)))
                adam.step()
                adam.zero_grad(set_to_none=True)
                window = []
                theta = theta_new.detach()
                ostate = {k: v.detach() for k, v in new_state.items()}
            else:
                theta = theta_new                            # keep the graph inside the unroll window
                ostate = new_state
            g = g_next
            bar.set_postfix(meta_loss=f"{np.mean(meta_losses[-16:]):.4f}")
        bar.close()
        acc, per = validate(setup, gml, val_domains, val_lr, val_batch_size, lam)
        rec = {"epoch": epoch, "meta_loss": float(np.mean(meta_losses)), "val_accuracy": acc, "per_domain": per,
               "meta_grad_norm": grad_norm_sum, "seconds": time.perf_counter() - t0}
        history.append(rec)
        if best["val_accuracy"] is None or acc > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": acc, "per_domain": per, "state_dict": copy.deepcopy(gml.state_dict())}
        _log(f"epoch {epoch}: meta-loss {rec['meta_loss']:.4f}  held-out val acc {acc:.2f}  (best {best['val_accuracy']:.2f} @ {best['epoch']})", quiet)
        with atomic_path(state_file) as tmp:
            torch.save({"gml": gml.state_dict(), "adam": adam.state_dict(), "rng": _rng_state(), "history": history,
                        "best": best, "epoch": epoch, "seconds": seconds_before + time.perf_counter() - t_start}, tmp)

    final = GradientMemoryLayer(hidden=gml.hidden, token_dim=gml.token_dim, seed=None)
    final.load_state_dict(best["state_dict"])
    card = {
        "kind": "mgg-gml",
        "meta_parameters": num_meta_parameters(final),
        "classifier": {"checkpoint": ckpt_path.name, "model": clf.card.model_name, "sha256": file_sha256(ckpt_path),
                       "adapted_scalars": engine.spec.numel},
        "loss": {"name": "foa", "lambda": engine.method.lam, "divisor": engine.method.divisor,
                 "source_stats": stats_path_for(ckpt_path).name, "source_stats_data": f"{data} train, clean"},
        "data": {"source": data, "split": "train", "samples": len(pairs), "corruptions": list(HELDOUT_CORRUPTIONS),
                 "severity": severity, "sample_seed": seed,
                 "sample_rule": "drawn once from the TRAIN split outside the validation subset, corruptions in equal shares",
                 "validation": {"split": "train", "images": int(len(val_idx)), "corruptions": list(HELDOUT_CORRUPTIONS),
                                "severity": severity, "batch_size": val_batch_size, "reset": "per corruption",
                                "lr": val_lr}},
        "training": {"epochs": epochs, "batch_size": batch_size, "meta_optimizer": "adam", "meta_lr": meta_lr,
                     "alpha_train": alpha_train, "unroll": unroll, "truncation": unroll,
                     "meta_objective": "FOA loss on the next batch after the MGG update",
                     "classifier_reset": "norm parameters, moments and memory restored to source every epoch",
                     "seed": seed, "init": init, "hidden": gml.hidden,
                     "seconds": round(seconds_before + time.perf_counter() - t_start, 1),
                     "invocations_resumed": int(resume and seconds_before > 0)},
        "best_epoch": best["epoch"], "best_val_accuracy": best["val_accuracy"],
        "best_val_per_domain": best.get("per_domain"),
        "history": [{k: v for k, v in h.items() if k != "per_domain"} for h in history],
        "deployment": {"optimizer": "mgg", "method": "foa", "lr": val_lr},
        "versions": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra_card:
        card.update(extra_card)
    final.save(out, card=card)
    if not keep_state and state_file.is_file():
        state_file.unlink()
    _log(f"wrote {out} (best epoch {best['epoch']}, held-out val acc {best['val_accuracy']:.2f})", quiet)
    return card


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


# ============================================================================================== CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pretrain", help="meta-train MGG (gradient memory layer) for a source classifier",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default="vit", help="'vit', 'resnet' (bundled) or a classifier .safetensors")
    p.add_argument("--data", default="mnist5k", help="the classifier's labelled source ('mnist5k' or a folder)")
    p.add_argument("--out", required=True, help="output GML checkpoint (.safetensors); card goes beside it (.json)")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"])
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    p.add_argument("--meta-lr", type=float, default=DEFAULTS["meta_lr"], help="Adam lr on the GML weights")
    p.add_argument("--alpha-train", type=float, default=DEFAULTS["alpha_train"], help="inner step during meta-training")
    p.add_argument("--val-lr", type=float, default=DEFAULTS["val_lr"], help="deployment step used for validation")
    p.add_argument("--unroll", type=int, default=DEFAULTS["unroll"], help="meta-gradient truncation length")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--severity", type=int, default=DEFAULTS["severity"])
    p.add_argument("--val-images", type=int, default=DEFAULTS["val_images"])
    p.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    p.add_argument("--lam", type=float, default=0.4,
                   help="weight of FOA's feature-discrepancy term in the loss (0: entropy only, TENT's loss)")
    p.add_argument("--init", default=None, help="start from this GML checkpoint instead of a fresh one")
    p.add_argument("--resume", action="store_true", help="continue from OUT's .pretrain-state.pt")
    p.add_argument("--write-stats", action="store_true",
                   help="also write the classifier's FOA source statistics beside its checkpoint if absent")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_threads_argument(p, default=1)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run)
    return p


def _run(args: argparse.Namespace) -> int:
    if args.write_stats:
        ck = default_checkpoint(args.classifier) if args.classifier in ("vit", "resnet") else args.classifier
        source_stats_for(load_classifier(ck), data=args.data, write=True)
    pretrain(args.classifier, args.out, data=args.data, samples=args.samples, batch_size=args.batch_size,
             epochs=args.epochs, meta_lr=args.meta_lr, alpha_train=args.alpha_train, val_lr=args.val_lr,
             unroll=args.unroll, seed=args.seed, severity=args.severity, val_images=args.val_images,
             hidden=args.hidden, init=args.init, lam=args.lam, resume=args.resume, cache_dir=args.cache_dir, device=args.device,
             progress=not args.no_progress, quiet=args.quiet)
    return 0
