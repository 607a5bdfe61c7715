"""AdaptationEngine: one frozen backbone, many streams.

Per batch: forward with the stream's adapted scalars (``torch.func.functional_call``; the shared module is never
modified or deep-copied per stream), the method's loss and filter, its gradient, the optimizer's update, guards.
Predictions returned are those of the forward pass *before* the update (the standard online protocol).
"""
from __future__ import annotations

import copy
import hashlib
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .features import FeatureTaps
from .losses import softmax_entropy
from .methods import GradOutput, Method, StepContext, Timer, build_method
from .optim import Optimizer, build_optimizer
from .params import ParamSpec, initial_vector, select_norm_params, use_batch_statistics
from .reasons import ResetReason, RollbackReason, SkipReason
from .state import StreamState

#: default step sizes per optimizer (reference: ViT-B/16, batch 64)
DEFAULT_LR = {"sgd": 1e-3, "adam": 1e-3, "mgg": 1e-3}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class GuardConfig:
    """Label-free collapse guard. A stream collapses when its predictions concentrate on one class
    (EMA share of the most frequent predicted class >= max_class_share) or spread out to near-uniform
    (EMA of batch mean entropy / ln C >= max_entropy). On collapse the stream rolls back to its last healthy
    anchor, or to source when there is none."""

    enabled: bool = False
    momentum: float = 0.9
    max_class_share: float = 0.8
    max_entropy: float = 0.95
    warmup_batches: int = 10
    anchor_every: int = 10


@dataclass
class EngineConfig:
    method: str = "foa"
    optimizer: str | None = None            # None: the method's default
    lr: float | None = None                 # None: the MGG card's deployment lr, else DEFAULT_LR[optimizer]
    method_kwargs: dict = field(default_factory=dict)
    optimizer_kwargs: dict = field(default_factory=dict)
    mgg_checkpoint: str | None = None
    bn_stats: str | None = None             # None: the method's default ("batch" for adapting methods)
    guard: GuardConfig = field(default_factory=GuardConfig)
    device: str = "cpu"


@dataclass
class StepResult:
    logits: torch.Tensor                    # (N, C), pre-update, on CPU
    adapted: bool
    skipped_reason: SkipReason | None
    loss: float | None
    batch_entropy: float                    # mean entropy / ln C, in [0, 1]
    sample_entropy: torch.Tensor            # (N,) entropy / ln C
    n_selected: int
    step: int                               # updates the stream has taken after this batch
    rolled_back: bool = False
    rollback_reason: RollbackReason | None = None
    reset_reason: ResetReason | None = None
    timings: dict[str, float] = field(default_factory=dict)


class AdaptationEngine:
    def __init__(self, classifier, config: EngineConfig | None = None, *, num_classes: int | None = None,
                 source_stats: dict[str, torch.Tensor] | None = None, fisher: torch.Tensor | None = None,
                 optimizer: Optimizer | None = None, model_id: str | None = None):
        self.config = config = config or EngineConfig()
        self.device = resolve_device(config.device)
        model: nn.Module = getattr(classifier, "model", classifier)
        card = getattr(classifier, "card", None)
        self.num_classes = int(num_classes or getattr(classifier, "num_classes", 0) or model.num_classes)
        self.class_names = list(getattr(classifier, "class_names", None) or [str(i) for i in range(self.num_classes)])
        self.model_id = model_id or (getattr(card, "model_name", None) or type(model).__name__)

        self.method: Method = build_method(config.method, self.num_classes, **config.method_kwargs)
        self.bn_stats = config.bn_stats or self.method.bn_stats
        if self.bn_stats not in ("batch", "source"):
            raise ValueError(f"bn_stats must be 'batch' or 'source', not {self.bn_stats!r}")

        # one private, frozen copy of the backbone per engine (never per stream or per step)
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.model.requires_grad_(False)
        if self.bn_stats == "batch":
            use_batch_statistics(self.model)
        self.spec: ParamSpec = select_norm_params(self.model)
        self.theta0 = initial_vector(self.model, self.spec).to(self.device)
        self.taps = FeatureTaps(self.model) if self.method.needs_features else None
        self.source_stats = {k: v.to(self.device) for k, v in source_stats.items()} if source_stats else None
        if fisher is not None:
            if not hasattr(self.method, "fisher"):
                raise ValueError(f"method {self.method.name!r} takes no Fisher information")
            if fisher.numel() != self.spec.numel:
                raise ValueError(f"Fisher has {fisher.numel()} entries, the model adapts {self.spec.numel} scalars")
            self.method.fisher = fisher.to(self.device).reshape(-1)

        self.optimizer: Optimizer | None = None
        if self.method.needs_grad:
            if optimizer is not None:
                self.optimizer = optimizer
            else:
                name = (config.optimizer or self.method.default_optimizer or "sgd").lower()
                self.optimizer = build_optimizer(name, config.lr, config.mgg_checkpoint, device=self.device,
                                                 default_lr=DEFAULT_LR.get(name, 1e-3), **config.optimizer_kwargs)
            if hasattr(self.optimizer, "gml"):
                self.optimizer.gml.to(self.device)
        self._lock = threading.Lock()   # functional_call swaps module attributes: one forward at a time
        self._initial = self._initial_tensors()
        self.fingerprint = {
            "model": self.model_id, "adapted_scalars": self.spec.numel, "num_classes": self.num_classes,
            "method": self.method.name, "optimizer": self.optimizer.name if self.optimizer else None,
            "bn_stats": self.bn_stats,
            "layout": hashlib.sha1(repr((self.spec.names, self.spec.shapes)).encode()).hexdigest()[:16],
        }

    # ---------------------------------------------------------------- description
    def describe(self) -> dict:
        return {
            "model": self.model_id, "num_classes": self.num_classes, "adapted_scalars": self.spec.numel,
            "adapted_layers": len(self.spec.names), "method": self.method.name, "method_hparams": self.method.hparams(),
            "optimizer": self.optimizer.describe() if self.optimizer else None, "bn_stats": self.bn_stats,
            "guard": asdict(self.config.guard), "device": str(self.device),
        }

    # ---------------------------------------------------------------- state
    def _initial_tensors(self) -> dict[str, torch.Tensor]:
        t = {"theta": self.theta0.clone()}
        if self.optimizer is not None:
            t.update({f"opt.{k}": v for k, v in self.optimizer.init_state(self.theta0).items()})
        t.update({f"method.{k}": v for k, v in self.method.init_state(self.device).items()})
        t["guard.entropy_ema"] = torch.full((), float("nan"), device=self.device)
        t["guard.class_share"] = torch.zeros(self.num_classes, device=self.device)
        return t

    def new_state(self, seed: int = 0) -> StreamState:
        return StreamState(tensors={k: v.clone() for k, v in self._initial.items()},
                           fingerprint=dict(self.fingerprint), seed=seed)

    def reset(self, state: StreamState) -> None:
        """Exact reset to source, in place."""
        state.tensors = {k: v.clone() for k, v in self._initial.items()}
        state.step = state.batches = state.images = state.skipped = 0
        state.anchor, state.anchor_step, state.healthy_streak = None, 0, 0
        state.resets += 1

    def load_state(self, path) -> StreamState:
        return StreamState.load(path, expected_fingerprint=self.fingerprint, device=self.device)

    # ---------------------------------------------------------------- forward
    def _forward(self, theta: torch.Tensor, x: torch.Tensor, features: bool = False):
        params = self.spec.views(theta)
        with self._lock:
            if features:
                if self.taps is None:
                    raise RuntimeError("this engine's method uses no feature taps")
                with self.taps.collect() as sink:
                    logits = functional_call(self.model, params, (x,))
                return logits, FeatureTaps.concat(sink)
            return functional_call(self.model, params, (x,)), None

    @torch.no_grad()
    def predict(self, state: StreamState, x: torch.Tensor) -> torch.Tensor:
        return self._forward(state.theta, x.to(self.device))[0].cpu()

    @torch.no_grad()
    def source_features(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.taps or FeatureTaps(self.model)
        params = self.spec.views(self.theta0)
        with self._lock, taps.collect() as sink:
            functional_call(self.model, params, (x.to(self.device),))
        if taps is not self.taps:
            taps.remove()
        return FeatureTaps.concat(sink)

    # ---------------------------------------------------------------- one online step
    def step(self, state: StreamState, x: torch.Tensor, adapt: bool = True) -> StepResult:
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch (N, C, H, W), got shape {tuple(x.shape)}")
        timer = Timer(self.device)
        x = x.to(self.device)
        state.last_seen = time.time()
        if not (self.method.needs_grad and adapt):
            with torch.no_grad(), timer("forward"):
                logits = self._forward(state.theta, x)[0]
            out = GradOutput(logits, skipped_reason=self.method.no_update_reason if not self.method.needs_grad
                             else SkipReason.ADAPTATION_DISABLED)
            adapted = False
        else:
            gen = torch.Generator().manual_seed((state.seed * 1_000_003 + state.batches) % (2 ** 63))
            ctx = StepContext(x=x, theta=state.theta, theta0=self.theta0, state=state.group("method"),
                              forward=self._forward, timer=timer, generator=gen, source_stats=self.source_stats)
            out = self.method.gradient(ctx)
            adapted = False
            if out.skipped_reason is None and not bool(torch.isfinite(out.grad).all()):
                out.skipped_reason = SkipReason.NON_FINITE_GRAD
            if out.skipped_reason is None:
                with timer("optimizer"):
                    new_theta, new_opt = self.optimizer.update(state.theta, out.grad, state.group("opt"))
                    new_theta = self.method.post_update(new_theta, self.theta0)
                if not bool(torch.isfinite(new_theta).all()):
                    out.skipped_reason = SkipReason.NON_FINITE_UPDATE
                else:
                    state.tensors["theta"] = new_theta.detach()
                    state.set_group("opt", {k: v.detach() for k, v in new_opt.items()})
                    state.set_group("method", {k: v.detach() for k, v in out.state_updates.items()})
                    state.step += 1
                    adapted = True
            if not adapted:
                state.skipped += 1
        state.batches += 1
        state.images += x.shape[0]

        logits = out.logits.detach()
        ent = (softmax_entropy(logits.float()) / math.log(self.num_classes)).clamp(0, 1)
        result = StepResult(
            logits=logits.cpu(), adapted=adapted, skipped_reason=out.skipped_reason, loss=out.loss,
            batch_entropy=float(ent.mean()), sample_entropy=ent.cpu(), n_selected=out.n_selected, step=state.step,
            timings=timer.times,
        )
        self._guard(state, logits, float(ent.mean()), result)
        if out.request_reset and not result.rolled_back:
            self.reset(state)
            result.reset_reason = self.method.recovery_reason
        result.step = state.step
        return result

    # ---------------------------------------------------------------- collapse guard
    def _guard(self, state: StreamState, logits: torch.Tensor, batch_entropy: float, result: StepResult) -> None:
        g = self.config.guard
        hist = torch.bincount(logits.argmax(1), minlength=self.num_classes).float() / logits.shape[0]
        old_e = state.tensors["guard.entropy_ema"]
        m = g.momentum
        state.tensors["guard.entropy_ema"] = (torch.full_like(old_e, batch_entropy) if torch.isnan(old_e)
                                              else m * old_e + (1 - m) * batch_entropy)
        share = state.tensors["guard.class_share"]
        state.tensors["guard.class_share"] = hist.to(share) if float(share.sum()) == 0 else m * share + (1 - m) * hist.to(share)
        if not (g.enabled and self.method.needs_grad):
            return
        reason: RollbackReason | None = None
        if state.batches >= g.warmup_batches:
            if (state.top_class_share or 0.0) >= g.max_class_share:
                reason = RollbackReason.CLASS_COLLAPSE
            elif (state.entropy_ema or 0.0) >= g.max_entropy:
                reason = RollbackReason.ENTROPY_DIVERGENCE
        if reason is None:
            if result.adapted:
                state.healthy_streak += 1
                if state.healthy_streak % g.anchor_every == 0:
                    state.anchor = {k: v.clone() for k, v in state.tensors.items()}
                    state.anchor_step = state.step
            return
        result.rolled_back, result.rollback_reason = True, reason
        rollbacks = state.rollbacks + 1
        if state.anchor is not None:
            state.tensors = state.anchor
            state.step = state.anchor_step
            state.anchor = None                 # a second collapse before a new healthy anchor goes to source
        else:
            resets = state.resets
            self.reset(state)
            state.resets = resets
        state.healthy_streak = 0
        state.rollbacks = rollbacks


def compute_fisher(engine: AdaptationEngine, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """EATA's diagonal Fisher over the adapted scalars: mean over clean batches of the squared gradient of the
    cross-entropy with the model's own predictions as labels."""
    total, n = None, 0
    for x in batches:
        theta = engine.theta0.clone().requires_grad_(True)
        logits, _ = engine._forward(theta, x.to(engine.device))
        loss = torch.nn.functional.cross_entropy(logits, logits.argmax(1).detach())
        (g,) = torch.autograd.grad(loss, theta)
        total = g.pow(2) if total is None else total + g.pow(2)
        n += 1
    if total is None:
        raise ValueError("no clean batches given for the Fisher information")
    return (total / n).detach()
