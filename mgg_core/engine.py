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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from .features import FeatureTaps
from .guard import (
    HOLD_REASONS,
    GuardConfig,
    check_count,
    guard_init_state,
    hold_length,
    judge,
    observe,
    source_failing,
)
from .losses import softmax_entropy
from .methods import GradOutput, Method, StepContext, Timer, build_method
from .normstats import StreamNormStats
from .optim import Optimizer, build_optimizer
from .params import ParamSpec, initial_vector, select_norm_params
from .reasons import ResetReason, RollbackReason, SkipReason
from .state import StreamState

#: default step sizes per optimizer (reference: ViT-B/16, batch 64)
DEFAULT_LR = {"sgd": 1e-3, "adam": 1e-3, "mgg": 1e-3}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class EngineConfig:
    method: str = "foa"
    optimizer: str | None = None            # None: the method's default
    lr: float | None = None                 # None: the MGG card's deployment lr, else DEFAULT_LR[optimizer]
    method_kwargs: dict = field(default_factory=dict)
    optimizer_kwargs: dict = field(default_factory=dict)
    mgg_checkpoint: str | None = None
    bn_stats: str | None = None             # None: the method's default ("batch" for adapting methods)
    bn_momentum: float = 0.05               # per-image momentum of bn_stats="ema" (normstats.StreamNormStats)
    update_images: int = 1                  # accumulate gradients until this many images, then one update
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
        n_model: int = getattr(model, "num_classes", 0)
        self.num_classes = int(num_classes or getattr(classifier, "num_classes", 0) or n_model)
        self.class_names = list(getattr(classifier, "class_names", None) or [str(i) for i in range(self.num_classes)])
        self.model_id = model_id or (getattr(card, "model_name", None) or type(model).__name__)

        self.method: Method = build_method(config.method, self.num_classes, **config.method_kwargs)
        self.bn_stats = config.bn_stats or self.method.bn_stats
        if int(config.update_images) < 1:
            raise ValueError(f"update_images must be >= 1, got {config.update_images}")
        self.update_images = int(config.update_images)

        # one private, frozen copy of the backbone per engine (never per stream or per step)
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.model.requires_grad_(False)
        self.norm = StreamNormStats(self.model, self.bn_stats, config.bn_momentum)
        self._source_norm = self.norm.init_state()
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
        # FOA-style losses need feature statistics over enough images: keep the features of recent images
        self.feature_window = (self.update_images - 1 if self.method.needs_features and self.source_stats is not None
                               and self.method.needs_grad else 0)
        self._initial = self._initial_tensors()
        self.fingerprint = {
            "model": self.model_id, "adapted_scalars": self.spec.numel, "num_classes": self.num_classes,
            "method": self.method.name, "optimizer": self.optimizer.name if self.optimizer else None,
            "bn_stats": self.bn_stats, "bn_momentum": float(config.bn_momentum) if self.norm.per_stream else None,
            "update_images": self.update_images, "feature_window": self.feature_window,
            "layout": hashlib.sha1(repr((self.spec.names, self.spec.shapes)).encode()).hexdigest()[:16],
        }

    # ---------------------------------------------------------------- description
    def describe(self) -> dict:
        return {
            "model": self.model_id, "num_classes": self.num_classes, "adapted_scalars": self.spec.numel,
            "adapted_layers": len(self.spec.names), "method": self.method.name, "method_hparams": self.method.hparams(),
            "optimizer": self.optimizer.describe() if self.optimizer else None, "bn_stats": self.bn_stats,
            "bn_momentum": self.config.bn_momentum, "update_images": self.update_images,
            "feature_window": self.feature_window,
            "guard": asdict(self.config.guard), "device": str(self.device),
        }

    # ---------------------------------------------------------------- state
    def _initial_tensors(self) -> dict[str, torch.Tensor]:
        t = {"theta": self.theta0.clone()}
        if self.optimizer is not None:
            t.update({f"opt.{k}": v for k, v in self.optimizer.init_state(self.theta0).items()})
        t.update({f"method.{k}": v for k, v in self.method.init_state(self.device).items()})
        t.update({f"norm.{k}": v.to(self.device) for k, v in self.norm.init_state().items()})
        if self.optimizer is not None and self.update_images > 1:
            t["accum.grad"] = torch.zeros_like(self.theta0)
            t["accum.images"] = torch.zeros((), dtype=torch.int64, device=self.device)
        if self.feature_window:
            dim = int(self.source_stats["mean"].numel())  # type: ignore[index]
            t["window.features"] = torch.zeros(self.feature_window, dim, device=self.device)
            t["window.count"] = torch.zeros((), dtype=torch.int64, device=self.device)
        t.update({f"guard.{k}": v for k, v in guard_init_state(self.num_classes, self.device).items()})
        return t

    def new_state(self, seed: int = 0) -> StreamState:
        return StreamState(tensors={k: v.clone() for k, v in self._initial.items()},
                           fingerprint=dict(self.fingerprint), seed=seed)

    def reset(self, state: StreamState) -> None:
        """Exact reset to source, in place (a new stream's state: the annotations go too; ``resets`` counts it)."""
        self._to_source(state)
        state.annotations = {}
        state.resets += 1

    def _to_source(self, state: StreamState) -> None:
        """The adaptation back to source, in place, for the engine's own fallbacks (guard, SAR recovery): the
        annotations of the layers above (the service's idempotency records) and the counters are kept."""
        state.tensors = {k: v.clone() for k, v in self._initial.items()}
        state.step = state.batches = state.images = state.skipped = 0
        state.anchor, state.anchor_step, state.healthy_streak = None, 0, 0

    def load_state(self, path) -> StreamState:
        return StreamState.load(path, expected_fingerprint=self.fingerprint, device=self.device)

    # ---------------------------------------------------------------- forward
    def _forward(self, theta: torch.Tensor, x: torch.Tensor, features: bool = False,
                 norm: dict[str, torch.Tensor] | None = None, norm_sink: dict | None = None, update_norm: bool = True):
        """Logits (and tapped features) of ``x`` with the adapted scalars ``theta``. ``norm``: the stream's
        BatchNorm statistics (None: the source's); ``norm_sink``, when given and still empty, receives their update."""
        params = self.spec.views(theta)
        with self._lock, self.norm.use(norm or {}, x.shape[0], record=norm_sink is not None and not norm_sink,
                                       update=update_norm) as updates:
            if features:
                if self.taps is None:
                    raise RuntimeError("this engine's method uses no feature taps")
                with self.taps.collect() as sink:
                    logits = functional_call(self.model, params, (x,))
                out: tuple[torch.Tensor, torch.Tensor | None] = logits, FeatureTaps.concat(sink)
            else:
                out = functional_call(self.model, params, (x,)), None
            if norm_sink is not None and not norm_sink:
                norm_sink.update(updates)
        return out

    def _stream_forward(self, state: StreamState, norm_sink: dict, window_sink: dict | None = None):
        """The forward a method sees for one step of ``state``: the stream's BatchNorm statistics, and, for
        feature-statistics losses on small batches, the features of the stream's recent images (detached) in front
        of the batch's, whose gradient is scaled by (rows / batch rows) so that gradients accumulated over
        ``update_images`` images weigh the statistics term as one batch of that size would."""
        norm = state.group("norm")

        def forward(theta, x, features=False):
            logits, feats = self._forward(theta, x, features, norm, norm_sink)
            if feats is None or not self.feature_window:
                return logits, feats
            live = feats
            if window_sink is not None and "features" not in window_sink:
                window_sink["features"] = live.detach()
            k = min(int(state.tensors["window.count"]), max(0, self.update_images - live.shape[0]))
            if k == 0:
                return logits, feats
            scale = (k + live.shape[0]) / live.shape[0]
            live = live.detach() + scale * (live - live.detach())
            return logits, torch.cat([state.tensors["window.features"][-k:], live])

        return forward

    @torch.no_grad()
    def predict(self, state: StreamState, x: torch.Tensor) -> torch.Tensor:
        """Logits with the stream's current state (statistics not updated)."""
        x = x.to(self.device)
        return self._forward(state.theta, x, norm=state.group("norm"), update_norm=False)[0].cpu()

    @torch.no_grad()
    def source_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the source model (source parameters and statistics)."""
        return self._forward(self.theta0, x.to(self.device), norm=self._source_norm, update_norm=False)[0]

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
        norm_sink: dict[str, torch.Tensor] = {}
        hold = float(state.tensors.get("guard.hold", torch.zeros(())))
        if hold > 0:   # the guard found the source better here: no adaptation (or statistics only) for a while
            state.tensors["guard.hold"] = torch.clamp(state.tensors["guard.hold"] - x.shape[0], min=0)
        # statistics keep adapting when not holding, or in a statistics-only hold (guard.py)
        update_norm = adapt and (hold <= 0 or float(state.tensors.get("guard.hold_stats", torch.zeros(()))) > 0)
        if not (self.method.needs_grad and adapt and hold <= 0):
            with torch.no_grad(), timer("forward"):
                logits = self._forward(state.theta, x, norm=state.group("norm"), norm_sink=norm_sink,
                                       update_norm=update_norm)[0]
            out = GradOutput(logits, skipped_reason=self.method.no_update_reason if not self.method.needs_grad
                             else SkipReason.GUARD_HOLD if hold > 0 and adapt else SkipReason.ADAPTATION_DISABLED)
            adapted = False
            if update_norm:
                state.set_group("norm", norm_sink)
        else:
            out, adapted = self._adapt(state, x, timer, norm_sink)
        state.batches += 1
        state.images += x.shape[0]

        logits = out.logits.detach()
        ent = (softmax_entropy(logits.float()) / math.log(self.num_classes)).clamp(0, 1)
        result = StepResult(
            logits=logits.cpu(), adapted=adapted, skipped_reason=out.skipped_reason, loss=out.loss,
            batch_entropy=float(ent.mean()), sample_entropy=ent.cpu(), n_selected=out.n_selected, step=state.step,
            timings=timer.times,
        )
        self._guard(state, x, logits, result, timer)
        if out.request_reset and not result.rolled_back:
            self._to_source(state)
            state.resets += 1
            result.reset_reason = self.method.recovery_reason
        result.step = state.step
        return result

    def step_many(self, items: Sequence[tuple[StreamState, torch.Tensor]], adapt: bool = True) -> list[StepResult]:
        """One step on each of several *distinct* streams: ``[step(state, x) for state, x in items]``.

        Contract (what a fused implementation must keep): each stream gets exactly the update, optimizer state,
        statistics, guard decisions and predictions it would get from :meth:`step` alone, whatever other streams
        share the call; results come back in the order of ``items``. A stream may appear at most once per call
        (its steps are ordered; the caller runs a second request of the same stream in a later call).
        """
        seen: set[int] = set()
        for state, _ in items:
            if id(state) in seen:
                raise ValueError("step_many: a stream appears more than once in one call")
            seen.add(id(state))
        return [self.step(state, x, adapt=adapt) for state, x in items]

    def _adapt(self, state: StreamState, x: torch.Tensor, timer: Timer, norm_sink: dict) -> tuple[GradOutput, bool]:
        """The method's gradient, accumulated over ``update_images`` images, and the optimizer's update; commits
        the stream's state only when nothing was rejected."""
        assert self.optimizer is not None
        window_sink: dict[str, torch.Tensor] = {}
        gen = torch.Generator().manual_seed((state.seed * 1_000_003 + state.batches) % (2 ** 63))
        ctx = StepContext(x=x, theta=state.theta, theta0=self.theta0, state=state.group("method"),
                          forward=self._stream_forward(state, norm_sink, window_sink), timer=timer, generator=gen,
                          source_stats=self.source_stats)
        out = self.method.gradient(ctx)
        raw = out.grad
        if out.skipped_reason is None and (raw is None or not bool(torch.isfinite(raw).all())):
            out.skipped_reason = SkipReason.NON_FINITE_GRAD
        if out.skipped_reason is not None or raw is None:
            state.skipped += 1
            return out, False
        grad, n = raw, x.shape[0]
        pending = int(state.tensors["accum.images"]) if "accum.images" in state.tensors else 0
        if pending:
            grad = (state.tensors["accum.grad"] + n * grad) / (pending + n)
        commit = {"norm": norm_sink, "method": {k: v.detach() for k, v in out.state_updates.items()}}
        if pending + n < self.update_images:   # not enough images yet: accumulate, update later
            commit["accum"] = {"grad": state.tensors["accum.grad"] + n * raw,
                               "images": state.tensors["accum.images"] + n}
            self._commit(state, commit, window_sink)
            out.skipped_reason = SkipReason.ACCUMULATING
            return out, False
        with timer("optimizer"):
            new_theta, new_opt = self.optimizer.update(state.theta, grad, state.group("opt"))
            new_theta = self.method.post_update(new_theta, self.theta0)   # e.g. ROID's weight ensembling
        if not bool(torch.isfinite(new_theta).all()):
            out.skipped_reason = SkipReason.NON_FINITE_UPDATE
            state.skipped += 1
            return out, False
        if "accum.grad" in state.tensors:
            commit["accum"] = {"grad": torch.zeros_like(state.tensors["accum.grad"]),
                               "images": torch.zeros_like(state.tensors["accum.images"])}
        commit["opt"] = {k: v.detach() for k, v in new_opt.items()}
        state.tensors["theta"] = new_theta.detach()
        self._commit(state, commit, window_sink)
        state.step += 1
        return out, True

    def _commit(self, state: StreamState, groups: dict[str, dict], window_sink: dict) -> None:
        for prefix, values in groups.items():
            state.set_group(prefix, values)
        feats = window_sink.get("features")
        if self.feature_window and feats is not None:
            w = torch.cat([state.tensors["window.features"], feats.to(state.tensors["window.features"])])
            state.tensors["window.features"] = w[-self.feature_window:].clone()
            state.tensors["window.count"] = torch.clamp(state.tensors["window.count"] + feats.shape[0],
                                                        max=self.feature_window)

    # ---------------------------------------------------------------- collapse guard
    def _guard(self, state: StreamState, x: torch.Tensor, logits: torch.Tensor, result: StepResult,
               timer: Timer) -> None:
        """Update the stream's guard signals (guard.py) and fall back when adaptation hurts: to the last healthy
        anchor, or to source when there is none (or a second fallback comes before a new anchor)."""
        g = self.config.guard
        judged = g.enabled and self.method.needs_grad
        sig = state.group("guard")
        source_logits = None
        if judged and g.check_share > 0:   # also while holding: source_failing() ends a hold
            k, sig["credit"] = check_count(g, sig, x.shape[0])
            if k:
                with timer("guard"):
                    source_logits = self.source_predict(x[:k])
        state.set_group("guard", observe(g, sig, logits, source_logits))
        if not judged:
            return
        if float(state.tensors["guard.hold"]) > 0:
            if source_failing(g, state.group("guard")):
                state.tensors["guard.hold"] = torch.zeros_like(state.tensors["guard.hold"])
                state.tensors["guard.hold_stats"] = torch.zeros_like(state.tensors["guard.hold_stats"])
            elif float(state.tensors["guard.hold_stats"]) > 0:   # statistics-only hold: still judged
                reason = judge(g, state.group("guard"), state.images)
                if reason is not None:                           # the statistics hurt too: full source hold
                    self._fall_back(state, reason, result, statistics=False)
            return
        reason = judge(g, state.group("guard"), state.images)
        if reason is None:
            if result.adapted:
                before = state.healthy_streak
                state.healthy_streak += x.shape[0]
                if state.healthy_streak // g.anchor_every_images > before // g.anchor_every_images:
                    state.tensors["guard.backoff"] = torch.zeros_like(state.tensors["guard.backoff"])
                    state.anchor = {k: v.clone() for k, v in state.tensors.items()}
                    state.anchor_step = state.step
            return
        self._fall_back(state, reason, result)

    def _fall_back(self, state: StreamState, reason: RollbackReason, result: StepResult,
                   statistics: bool = True) -> None:
        """Roll ``state`` back for ``reason`` (guard.py); ``statistics=False``: a statistics-only hold escalates to a
        full source hold."""
        result.rolled_back, result.rollback_reason = True, reason
        rollbacks = state.rollbacks + 1
        held = float(state.tensors["guard.hold"]) > 0
        if reason in HOLD_REASONS or held:      # the source is better here: back to it, and stay a while
            backoff = state.tensors["guard.backoff"] + 1
            self._to_source(state)
            state.tensors["guard.backoff"] = backoff
            hold = hold_length(self.config.guard, state.group("guard"))
            state.tensors["guard.hold"] = torch.full_like(state.tensors["guard.hold"], hold)
            # the first fallback in a row keeps the statistics adapting (guard.py: statistics-only holds)
            stats_only = (statistics and self.config.guard.hold_statistics and self.norm.per_stream
                          and float(backoff) <= 1)
            state.tensors["guard.hold_stats"] = torch.full_like(state.tensors["guard.hold_stats"], float(stats_only))
        elif state.anchor is not None:
            state.tensors = state.anchor
            state.step = state.anchor_step
            state.anchor = None                 # a second fallback before a new healthy anchor goes to source
        else:
            self._to_source(state)
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
