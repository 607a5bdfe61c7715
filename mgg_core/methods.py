"""TTA methods: one small class each behind one interface, found through a registry.

A method turns a test batch into a gradient for the adapted scalars (its loss, its sample filter, its extra
passes); the optimizer (``optim.py``) turns that gradient into an update. So TENT + MGG, FOA + MGG (= MGTTA) and
SAR + SGD are all the same engine with different parts.

Reference hyper-parameters are given for ImageNet (C = 1000) in the papers; class-count dependent ones are scaled
here by ln C / ln 1000 (entropy margins: 0.4 ln C for EATA/SAR, 0.5 ln C for DeYO; SAR's reset constant
0.2 nats -> 0.2 ln C / ln 1000) and by sqrt(1000 / C) for EATA's cosine redundancy margin (0.05 at C = 1000,
the cosine of a one-hot vector with the uniform one being 1/sqrt(C)).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch
import torch.nn.functional as F

from .losses import feature_discrepancy, softmax_entropy

MethodState = dict[str, torch.Tensor]


class Timer:
    """Accumulates wall time per phase; synchronises CUDA so the numbers mean something on a GPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class StepContext:
    """What the engine hands a method for one batch."""

    x: torch.Tensor
    theta: torch.Tensor                      # current adapted scalars (detached)
    theta0: torch.Tensor                     # source values
    state: MethodState                       # this stream's method state (read only; return updates)
    forward: Callable                        # forward(theta, x, features: bool) -> (logits, features | None)
    timer: Timer
    generator: torch.Generator | None = None  # per-stream, per-step randomness (DeYO)
    source_stats: dict[str, torch.Tensor] | None = None


@dataclass
class GradOutput:
    logits: torch.Tensor                     # predictions of the first forward pass (before the update), detached
    loss: float | None = None
    grad: torch.Tensor | None = None
    skipped_reason: str | None = None
    state_updates: MethodState = field(default_factory=dict)
    n_selected: int = 0
    request_reset: bool = False


METHODS: dict[str, type[Method]] = {}


def register(cls):
    METHODS[cls.name] = cls
    return cls


@dataclass
class Method:
    """Base class. Subclasses set the class variables and implement ``objective`` (or override ``gradient``)."""

    name: ClassVar[str] = ""
    needs_grad: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    bn_stats: ClassVar[str] = "batch"        # "batch": BatchNorm uses test-batch statistics; "source": running stats
    default_optimizer: ClassVar[str | None] = "sgd"
    no_update_reason: ClassVar[str | None] = None   # skipped_reason reported by methods that never update

    num_classes: int = 1000

    @property
    def ln_c(self) -> float:
        return math.log(self.num_classes)

    def hparams(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float, str, bool)) or v is None:
                out[f.name] = v
        return out

    def init_state(self, device) -> MethodState:
        return {}

    def objective(self, ctx: StepContext, theta: torch.Tensor, logits: torch.Tensor, features):
        """-> (loss or None when no sample qualifies, state_updates, n_selected)."""
        raise NotImplementedError

    def gradient(self, ctx: StepContext) -> GradOutput:
        theta = ctx.theta.detach().requires_grad_(True)
        with ctx.timer("forward"):
            logits, feats = ctx.forward(theta, ctx.x, self.needs_features)
            loss, updates, n = self.objective(ctx, theta, logits, feats)
        if loss is None:
            return GradOutput(logits.detach(), skipped_reason="no_reliable_samples")
        if not torch.isfinite(loss):
            return GradOutput(logits.detach(), loss=float(loss.detach()), skipped_reason="non_finite_loss")
        with ctx.timer("backward"):
            (grad,) = torch.autograd.grad(loss, theta)
        return GradOutput(logits.detach(), float(loss.detach()), grad, state_updates=updates, n_selected=n)


@register
@dataclass
class NoAdapt(Method):
    name: ClassVar[str] = "noadapt"
    needs_grad: ClassVar[bool] = False
    bn_stats: ClassVar[str] = "source"
    default_optimizer: ClassVar[str | None] = None
    no_update_reason: ClassVar[str | None] = "adaptation_disabled"


@register
@dataclass
class BNAdapt(Method):
    """Test-batch BatchNorm statistics, no gradient step (Schneider et al. 2020)."""

    name: ClassVar[str] = "bn"
    needs_grad: ClassVar[bool] = False
    default_optimizer: ClassVar[str | None] = None
    no_update_reason: ClassVar[str | None] = "gradient_free_method"


@register
@dataclass
class Tent(Method):
    """Mean prediction entropy (Wang et al. 2021)."""

    name: ClassVar[str] = "tent"

    def objective(self, ctx, theta, logits, features):
        return softmax_entropy(logits).mean(), {}, logits.shape[0]


@register
@dataclass
class FOALoss(Method):
    """Entropy + FOA's feature-statistics discrepancy against clean source statistics (the MGTTA loss)."""

    name: ClassVar[str] = "foa"
    needs_features: ClassVar[bool] = True
    default_optimizer: ClassVar[str | None] = "mgg"
    lam: float = 0.4
    divisor: float = 64.0

    def loss(self, logits: torch.Tensor, features: torch.Tensor, source_stats: dict[str, torch.Tensor] | None):
        if source_stats is None:
            raise ValueError("method 'foa' needs source feature statistics (engine source_stats=...)")
        loss = softmax_entropy(logits).mean()
        if self.lam:
            loss = loss + self.lam * feature_discrepancy(features, source_stats["mean"], source_stats["std"],
                                                         self.divisor)
        return loss

    def objective(self, ctx, theta, logits, features):
        return self.loss(logits, features, ctx.source_stats), {}, logits.shape[0]


@register
@dataclass
class EATA(Method):
    """Reliable (entropy < E0) and non-redundant (cosine to the stream's mean prediction < eps) samples, weighted by
    1/exp(H - E0), plus an optional Fisher regulariser towards the source (Niu et al. 2022)."""

    name: ClassVar[str] = "eata"
    e_margin: float | None = None            # default 0.4 ln C
    d_margin: float | None = None            # default 0.05 sqrt(1000 / C)
    fisher_alpha: float = 2000.0
    prob_momentum: float = 0.9
    fisher: torch.Tensor | None = field(default=None, repr=False)  # diagonal Fisher over the adapted scalars

    def __post_init__(self):
        if self.e_margin is None:
            self.e_margin = 0.4 * self.ln_c
        if self.d_margin is None:
            self.d_margin = 0.05 * math.sqrt(1000.0 / self.num_classes)

    def init_state(self, device):
        return {"mean_probs": torch.zeros(self.num_classes, device=device),
                "mean_probs_set": torch.zeros((), device=device)}

    def objective(self, ctx, theta, logits, features):
        ent = softmax_entropy(logits)
        reliable = ent < self.e_margin
        probs = logits.softmax(1).detach()
        mean_probs, is_set = ctx.state["mean_probs"], bool(ctx.state["mean_probs_set"] > 0)
        keep = reliable.clone()
        if is_set and reliable.any():
            cos = F.cosine_similarity(mean_probs.unsqueeze(0), probs, dim=1)
            keep = reliable & (cos.abs() < self.d_margin)
        if not keep.any():
            return None, {}, 0
        sel_probs = probs[keep].mean(0)
        new_mean = self.prob_momentum * mean_probs + (1 - self.prob_momentum) * sel_probs if is_set else sel_probs
        coeff = torch.exp(-(ent[keep].detach() - self.e_margin))
        loss = (ent[keep] * coeff).mean()
        if self.fisher is not None and self.fisher_alpha:
            loss = loss + self.fisher_alpha * (self.fisher * (theta - ctx.theta0) ** 2).sum()
        updates = {"mean_probs": new_mean, "mean_probs_set": torch.ones_like(ctx.state["mean_probs_set"])}
        return loss, updates, int(keep.sum())


@register
@dataclass
class SAR(Method):
    """Reliable entropy minimisation with sharpness-aware steps and entropy-EMA model recovery (Niu et al. 2023).

    The gradient is taken at theta + rho g/||g|| (SAM) and applied at theta by the optimizer.
    """

    name: ClassVar[str] = "sar"
    e_margin: float | None = None            # default 0.4 ln C
    rho: float = 0.05
    reset_constant: float | None = None      # default 0.2 ln C / ln 1000
    ema_momentum: float = 0.9

    def __post_init__(self):
        if self.e_margin is None:
            self.e_margin = 0.4 * self.ln_c
        if self.reset_constant is None:
            self.reset_constant = 0.2 * self.ln_c / math.log(1000.0)

    def init_state(self, device):
        return {"loss_ema": torch.full((), float("nan"), device=device)}

    def gradient(self, ctx):
        theta = ctx.theta.detach().requires_grad_(True)
        with ctx.timer("forward"):
            logits, _ = ctx.forward(theta, ctx.x, False)
            ent = softmax_entropy(logits)
            sel1 = ent < self.e_margin
        if not sel1.any():
            return GradOutput(logits.detach(), skipped_reason="no_reliable_samples")
        loss1 = ent[sel1].mean()
        if not torch.isfinite(loss1):
            return GradOutput(logits.detach(), loss=float(loss1.detach()), skipped_reason="non_finite_loss")
        with ctx.timer("backward"):
            (g1,) = torch.autograd.grad(loss1, theta)
        if not torch.isfinite(g1).all():
            return GradOutput(logits.detach(), loss=float(loss1.detach()), skipped_reason="non_finite_grad")
        theta_adv = (theta.detach() + self.rho * g1 / (g1.norm() + 1e-12)).requires_grad_(True)
        with ctx.timer("forward"):
            logits2, _ = ctx.forward(theta_adv, ctx.x, False)
            ent2 = softmax_entropy(logits2)[sel1]
            sel2 = ent2 < self.e_margin
        if not sel2.any():
            return GradOutput(logits.detach(), loss=float(loss1.detach()), skipped_reason="no_reliable_samples")
        loss2 = ent2[sel2].mean()
        if not torch.isfinite(loss2):
            return GradOutput(logits.detach(), loss=float(loss2.detach()), skipped_reason="non_finite_loss")
        with ctx.timer("backward"):
            (grad,) = torch.autograd.grad(loss2, theta_adv)
        old = ctx.state["loss_ema"]
        ema = loss2.detach() if torch.isnan(old) else self.ema_momentum * old + (1 - self.ema_momentum) * loss2.detach()
        return GradOutput(logits.detach(), float(loss2.detach()), grad, state_updates={"loss_ema": ema},
                          n_selected=int(sel2.sum()), request_reset=bool(ema < self.reset_constant))


def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator | None) -> torch.Tensor:
    """Cut each image into grid x grid patches and permute them (one random permutation per image)."""
    n, c, h, w = x.shape
    hs, ws = (h // grid) * grid, (w // grid) * grid
    xr = F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False) if (hs, ws) != (h, w) else x
    ph, pw = hs // grid, ws // grid
    patches = xr.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1).to(x.device)
    patches = patches[torch.arange(n, device=x.device).unsqueeze(1), perm]
    out = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hs, ws)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False) if (hs, ws) != (h, w) else out


@register
@dataclass
class DeYO(Method):
    """Entropy filter + PLPD filter (confidence drop of the predicted class under patch shuffling), both also used
    as sample weights (Lee et al. 2024)."""

    name: ClassVar[str] = "deyo"
    e_margin: float | None = None            # filter, default 0.5 ln C
    e_margin0: float | None = None           # weighting, default 0.4 ln C
    plpd_threshold: float = 0.2
    grid: int = 4

    def __post_init__(self):
        if self.e_margin is None:
            self.e_margin = 0.5 * self.ln_c
        if self.e_margin0 is None:
            self.e_margin0 = 0.4 * self.ln_c

    def objective(self, ctx, theta, logits, features):
        ent = softmax_entropy(logits)
        sel = ent < self.e_margin
        if not sel.any():
            return None, {}, 0
        x_sel = ctx.x[sel]
        with torch.no_grad():
            shuffled = patch_shuffle(x_sel, self.grid, ctx.generator)
            probs_prime = ctx.forward(theta.detach(), shuffled, False)[0].softmax(1)
        probs = logits[sel].softmax(1).detach()
        pred = probs.argmax(1, keepdim=True)
        plpd = (probs.gather(1, pred) - probs_prime.gather(1, pred)).squeeze(1)
        keep = plpd > self.plpd_threshold
        if not keep.any():
            return None, {}, 0
        ent_k = ent[sel][keep]
        coeff = torch.exp(-(ent_k.detach() - self.e_margin0)) + torch.exp(plpd[keep].detach())
        return (ent_k * coeff).mean(), {}, int(keep.sum())


def build_method(name: str, num_classes: int, **kwargs) -> Method:
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[key]
    allowed = {f.name for f in fields(cls)} - {"num_classes"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"method {key!r} has no hyper-parameter(s) {sorted(unknown)}; it has {sorted(allowed)}")
    return cls(num_classes=num_classes, **kwargs)
