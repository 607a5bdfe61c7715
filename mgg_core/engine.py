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
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from .features import FeatureTaps
from .guard import (
    HOLD_REASONS,
    GuardConfig,
    check_count,
    fallback_hold,
    guard_init_state,
    hold_length,
    hold_release,
    image_descriptor,
    judge,
    observe_many,
)
from .losses import softmax_entropy
from .methods import GradOutput, Method, StepContext, Timer, build_method
from .normstats import StreamNormStats
from .optim import Optimizer, build_optimizer
from .params import ParamSpec, fusable_model, initial_vector, select_norm_params
from .reasons import HoldRelease, ResetReason, RollbackReason, SkipReason
from .segments import SegmentNorms
from .state import StreamState

__all__ = ["DEFAULT_LR", "FUSE_MAX_IMAGES", "STATISTICS_DESPITE_SKIP", "WARMUP_SLOW_IMAGES", "AdaptationEngine",
           "EngineConfig", "GuardConfig", "StepResult", "compute_fisher", "resolve_device"]

#: skipped gradient steps whose request still moves the stream's BatchNorm statistics: the method's loss selected
#: none of the images (EATA/SAR/DeYO filters), but the statistics describe every image the stream saw, so they do
#: not depend on how the images were cut into requests (a 1-image request is filtered alone, a 64-image one only
#: when all 64 are). Non-finite losses, gradients or updates leave the statistics untouched.
STATISTICS_DESPITE_SKIP = frozenset({SkipReason.NO_RELIABLE_SAMPLES})

#: default step sizes per optimizer (reference: ViT-B/16, batch 64)
DEFAULT_LR = {"sgd": 1e-3, "adam": 1e-3, "mgg": 1e-3}

#: largest request step_many fuses, per fused path, where EngineConfig.fuse_max_images is None: beyond it a request
#: amortises its own step (measured fused / separate, docs/results/fused/README.md: the vmap path loses from 32
#: images on; the segment path still gains at 32 on the ResNet and breaks even on the ViT)
FUSE_MAX_IMAGES = {"segment": 32, "vmap": 16}
#: time constant (images) of the slow descriptor reference of EngineConfig.bn_warmup_shift
WARMUP_SLOW_IMAGES = 64


def _slow_variance(state: StreamState) -> torch.Tensor:
    """Per-feature variance of ``bn_warmup_shift``'s slow descriptor reference (``warm.slow``, ``warm.slow_sq``),
    floored at 1e-4."""
    slow = state.tensors["warm.slow"]
    return (state.tensors["warm.slow_sq"] - slow.pow(2)).clamp(min=0) + 1e-4


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
    bn_momentum: float = 0.05               # per-image momentum of bn_stats="ema" (normstats.StreamNormStats);
                                            # of the deepest BatchNorm layer when bn_momentum_shallow is set
    bn_momentum_shallow: float | None = None  # per-image momentum of the first BatchNorm layer (None: bn_momentum);
                                            # geometric over the layers' order in between (normstats.layer_momenta)
    bn_prior_images: float | None = None    # statistics warm-up: image t since the source merges with momentum
                                            # max(m, 1/(N0+t+1)), N0 = this (normstats.warm_momentum); None: off
    bn_warmup_shift: float | None = None    # with bn_prior_images: the warm-up starts on a detected domain shift
                                            # (pixel descriptor this many slow std devs away; _warmup_on_shift),
                                            # not at a new stream or a restart from source; None: off
    bn_warmup_release: bool = False         # with bn_prior_images: the warm-up also starts when a guard hold ends
                                            # because the data moved to another domain (_restart_warmup); then a
                                            # new stream or a fallback starts with it over, as with bn_warmup_shift
    bn_balanced: float | None = None        # class-balanced statistics (normstats, TRIBE's Balanced BatchNorm): the
                                            # weight in (0, 1] of the class-uniform mixture of per-class statistics
                                            # updated with pseudo-labels of a no-grad pre-pass; None: off
    bn_balanced_form: str = "mixture"       # with bn_balanced: how the class statistics enter (normstats'
                                            # BALANCED_FORMS: "mixture", TRIBE's class-uniform mixture; "correction",
                                            # the stream's statistics with their recent class mix made uniform)
    bn_balanced_confidence: float | None = None  # with bn_balanced: only pre-pass labels of max softmax >= this (0, 1)
                                            # move the class statistics (and the recent class mix, whose confident
                                            # share scales "correction"); None: every image (normstats docstring)
    bn_balanced_agree: bool = False         # with bn_balanced: only pre-pass labels that agree with the frozen source
                                            # model's label (one source forward of the request, reused by the guard's
                                            # source checks) move the class statistics and the class mix
    bn_balanced_share: float | None = None  # with "correction" and a gate: the correction's weight fades to 0 where
                                            # the recent gated share is at most this (0, 0.5]; full from twice it
    update_images: int = 1                  # accumulate gradients until this many images, then one update
    guard: GuardConfig = field(default_factory=GuardConfig)
    device: str = "cpu"
    fused: bool = True                      # step_many fuses streams (False: one step per stream, same results)
    fuse_max_images: int | None = None      # step_many fuses requests of at most this many images (0: none; larger
                                            # ones amortise their own step); None: the fused path's FUSE_MAX_IMAGES
    segment_norms: bool = True              # step_many runs a group as one plain batch with segment-wise norm layers
                                            # where the model allows (segments.py); False: always the vmap path


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
    hold_released: HoldRelease | None = None   # the guard ended a hold at source early, after this batch
    hold_images: float | None = None        # this batch's fallback holds the stream at source for this many images
    reset_reason: ResetReason | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(eq=False)
class _Job:
    """One stream's step in progress, passed through the phases that :meth:`AdaptationEngine.step` and
    :meth:`AdaptationEngine.step_many` share (plan, gradient, update, source checks, guard)."""

    state: StreamState
    x: torch.Tensor
    timer: Timer
    adapt: bool
    hold: float                             # images left to hold at source when the request came
    grad: bool                              # the method's gradient is taken (else one forward, no gradient)
    update_norm: bool                       # the request moves the stream's BatchNorm statistics
    norm_sink: dict[str, torch.Tensor] = field(default_factory=dict)
    window_sink: dict[str, torch.Tensor] = field(default_factory=dict)
    out: GradOutput | None = None
    adapted: bool = False
    logits: torch.Tensor | None = None
    result: StepResult | None = None
    checks: int = 0                         # images the guard classifies with the source too
    guard_sig: dict[str, torch.Tensor] = field(default_factory=dict)
    source_logits: torch.Tensor | None = None
    source_all: torch.Tensor | None = None  # the agreement gate: the source's logits of every image of the request
    grad_finite: bool = False               # read by _read_gradients: the job's gradient is finite
    pending: int = 0                        # read by _read_gradients: images in the stream's gradient window


def _by_shape(jobs: list[_Job], key) -> dict[tuple[int, ...], list[_Job]]:
    """Jobs grouped by the shape of ``key(job)`` (vmap needs equal shapes; requests are never padded)."""
    groups: dict[tuple[int, ...], list[_Job]] = {}
    for job in jobs:
        groups.setdefault(tuple(key(job).shape), []).append(job)
    return groups


def _no_forward(*args, **kwargs):
    raise RuntimeError("a method declared fusable ran a forward pass of its own; declare it fusable = False")


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
        if config.fuse_max_images is not None and int(config.fuse_max_images) < 0:
            raise ValueError(f"fuse_max_images must be >= 0 (0: never fuse), got {config.fuse_max_images}")

        # one private, frozen copy of the backbone per engine (never per stream or per step)
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.model.requires_grad_(False)
        if config.bn_warmup_shift is not None and not (config.bn_warmup_shift > 0 and config.bn_prior_images):
            raise ValueError(f"bn_warmup_shift must be > 0 and needs bn_prior_images, got {config.bn_warmup_shift}")
        if config.bn_warmup_release and not config.bn_prior_images:
            raise ValueError("bn_warmup_release needs bn_prior_images (the warm-up it starts)")
        self.norm = StreamNormStats(self.model, self.bn_stats, config.bn_momentum, config.bn_momentum_shallow,
                                    config.bn_prior_images, warm_start=config.bn_warmup_shift is None
                                    and not config.bn_warmup_release, balanced=config.bn_balanced,
                                    num_classes=self.num_classes, balanced_form=config.bn_balanced_form,
                                    confidence=config.bn_balanced_confidence, agree=config.bn_balanced_agree,
                                    share=config.bn_balanced_share)
        #: class-balanced per-stream statistics: every request that moves them takes a no-grad pre-pass for labels
        self.balanced = self.norm.balanced_on
        self.warmup_shift = (float(config.bn_warmup_shift) if config.bn_warmup_shift is not None
                             and self.norm.per_stream else None)
        self.warmup_release = bool(config.bn_warmup_release) and self.norm.per_stream
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
        #: the state's keys per group ("guard" -> [("hold", "guard.hold"), ...]): :meth:`_group` reads a group by
        #: these instead of scanning every key of the state (a BatchNorm model's state has ~100)
        self._group_keys: dict[str, list[tuple[str, str]]] = {}
        for key in self._initial:
            prefix, _, name = key.partition(".")
            self._group_keys.setdefault(prefix, []).append((name, key))
        # step_many fuses streams when every adapted norm layer is of a type vmap batches (params.py)
        self.fused = bool(config.fused) and fusable_model(self.model)
        # gradients in the fused pass: a fusable method (one forward, objective, backward) and an optimizer whose
        # update does not amplify the fused kernels' different rounding (Optimizer.fusable)
        self.fuse_gradients = self.method.fusable and (self.optimizer is None or self.optimizer.fusable)
        # a group of streams runs as one plain batch with segment-wise norm layers when every layer type has a
        # segment implementation (segments.SEGMENT_NORMS), else as one vmapped forward
        self.segments = SegmentNorms(self.model, self.spec, self.norm)
        self.segment_fused = bool(config.segment_norms) and self.segments.supported
        #: fused group forwards run so far, by path ("segment", "vmap")
        self.fused_forwards: Counter[str] = Counter()
        self._attention: list[Any] = [m for m in self.model.modules()
                                      if isinstance(getattr(m, "fused_attn", None), bool)]
        self.fingerprint = {
            "model": self.model_id, "adapted_scalars": self.spec.numel, "num_classes": self.num_classes,
            "method": self.method.name, "optimizer": self.optimizer.name if self.optimizer else None,
            "bn_stats": self.bn_stats, "bn_momentum": float(config.bn_momentum) if self.norm.per_stream else None,
            "update_images": self.update_images, "feature_window": self.feature_window,
            "layout": hashlib.sha1(repr((self.spec.names, self.spec.shapes)).encode()).hexdigest()[:16],
        }
        if self.norm.per_stream and config.bn_momentum_shallow is not None:   # absent: uniform (older snapshots)
            self.fingerprint["bn_momentum_shallow"] = float(config.bn_momentum_shallow)
        if self.norm.per_stream and config.bn_prior_images is not None:      # absent: no warm-up (older snapshots)
            self.fingerprint["bn_prior_images"] = float(config.bn_prior_images)
        if self.warmup_shift is not None:
            self.fingerprint["bn_warmup_shift"] = self.warmup_shift
        if self.warmup_release:
            self.fingerprint["bn_warmup_release"] = True
        if self.balanced:                       # norm.*.cmean/.cvar (and norm.cseen) are kept
            self.fingerprint["bn_balanced"] = float(config.bn_balanced)  # type: ignore[arg-type]
            self.fingerprint["bn_balanced_form"] = config.bn_balanced_form
            if self.norm.confidence is not None:    # the class mix then sums to the confident share
                self.fingerprint["bn_balanced_confidence"] = self.norm.confidence
            if self.norm.agree:                     # ... to the agreeing share
                self.fingerprint["bn_balanced_agree"] = True
            if self.norm.share is not None:
                self.fingerprint["bn_balanced_share"] = self.norm.share
        if config.guard.enabled and config.guard.confident_entropy is not None:   # guard.source_entropy is judged
            self.fingerprint["guard_confident_entropy"] = float(config.guard.confident_entropy)
        if config.guard.enabled and config.guard.confident_hold_entropy is not None:   # guard.source_entropy too
            self.fingerprint["guard_confident_hold_entropy"] = float(config.guard.confident_hold_entropy)
        if config.guard.enabled and config.guard.judge_images is not None:   # guard.since_judge is counted
            self.fingerprint["guard_judge_images"] = int(config.guard.judge_images)
        if config.guard.enabled and config.guard.collapse_hold_images is not None:   # guard.hold means more
            self.fingerprint["guard_collapse_hold_images"] = int(config.guard.collapse_hold_images)
        if config.guard.enabled and config.guard.keep_source_history:   # guard.source_history is kept and judged
            self.fingerprint["guard_keep_source_history"] = True

    @property
    def fuse_max_images(self) -> int:
        """The largest request :meth:`step_many` fuses (``EngineConfig.fuse_max_images``, or the path's default)."""
        if self.config.fuse_max_images is not None:
            return int(self.config.fuse_max_images)
        return FUSE_MAX_IMAGES["segment" if self.segment_fused else "vmap"]

    # ---------------------------------------------------------------- description
    def describe(self) -> dict:
        """What the engine runs. The per-stream statistics settings (``bn_momentum`` ... ``bn_warmup_release``) are
        those in effect: None on a model without per-stream BatchNorm statistics (a LayerNorm ViT, or
        ``bn_stats`` 'source'/'batch'), where they do nothing."""
        per_stream = self.norm.per_stream
        c = self.config
        return {
            "model": self.model_id, "num_classes": self.num_classes, "adapted_scalars": self.spec.numel,
            "adapted_layers": len(self.spec.names), "method": self.method.name, "method_hparams": self.method.hparams(),
            "optimizer": self.optimizer.describe() if self.optimizer else None, "bn_stats": self.bn_stats,
            "bn_momentum": c.bn_momentum if per_stream else None,
            "bn_momentum_shallow": c.bn_momentum_shallow if per_stream else None,
            "bn_prior_images": c.bn_prior_images if per_stream else None, "bn_warmup_shift": self.warmup_shift,
            "bn_warmup_release": self.warmup_release if per_stream else None,
            "bn_balanced": self.norm.balanced if self.balanced else None,
            "bn_balanced_form": c.bn_balanced_form if self.balanced else None,
            "bn_balanced_confidence": self.norm.confidence if self.balanced else None,
            "bn_balanced_agree": self.norm.agree if self.balanced else None,
            "bn_balanced_share": self.norm.share if self.balanced else None,
            "update_images": self.update_images,
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
        g = self.config.guard
        confident = g.enabled and (g.confident_entropy is not None     # the fingerprint says so (__init__)
                                   or g.confident_hold_entropy is not None)
        judge_count = g.enabled and g.judge_images is not None       # the fingerprint says so (__init__)
        history = g.enabled and g.keep_source_history                # the fingerprint says so (__init__)
        t.update({f"guard.{k}": v for k, v in guard_init_state(self.num_classes, self.device, confident,
                                                                judge_count, history).items()})
        if self.warmup_shift is not None:     # the slow descriptor reference of _warmup_on_shift (unset: NaN)
            nan = torch.full((len(t["guard.shift_fast"]),), float("nan"), dtype=torch.float64, device=self.device)
            t["warm.slow"], t["warm.slow_sq"] = nan, nan.clone()
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

    def _group(self, state: StreamState, prefix: str) -> dict[str, torch.Tensor]:
        """``state.group(prefix)`` for the groups of this engine's states, read by their known keys (a state that
        lacks one, e.g. an older snapshot, is read by ``state.group``); keys outside the layout are not included."""
        tensors = state.tensors
        try:
            return {name: tensors[key] for name, key in self._group_keys.get(prefix, ())}
        except KeyError:
            return state.group(prefix)

    def load_state(self, path) -> StreamState:
        return StreamState.load(path, expected_fingerprint=self.fingerprint, device=self.device)

    # ---------------------------------------------------------------- forward
    def _forward(self, theta: torch.Tensor, x: torch.Tensor, features: bool = False,
                 norm: dict[str, torch.Tensor] | None = None, norm_sink: dict | None = None, update_norm: bool = True,
                 labels: torch.Tensor | None = None):
        """Logits (and tapped features) of ``x`` with the adapted scalars ``theta``. ``norm``: the stream's
        BatchNorm statistics (None: the source's); ``norm_sink``, when given and still empty, receives their update;
        ``labels``: the request's pseudo-labels for balanced statistics (:meth:`_pseudo_labels`)."""
        params = self.spec.views(theta)
        with self._lock, self.norm.use(norm or {}, x.shape[0], record=norm_sink is not None and not norm_sink,
                                       update=update_norm, labels=labels) as updates:
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

    def _stream_forward(self, state: StreamState, norm_sink: dict, window_sink: dict | None = None,
                        source: torch.Tensor | None = None):
        """The forward a method sees for one step of ``state``: the stream's BatchNorm statistics, and, for
        feature-statistics losses on small batches, the features of the stream's recent images (detached) in front
        of the batch's, whose gradient is scaled by (rows / batch rows) so that gradients accumulated over
        ``update_images`` images weigh the statistics term as one batch of that size would. ``source``: the source
        model's logits of the request (the agreement gate of the pre-pass labels)."""
        norm = self._group(state, "norm")
        labels: list[torch.Tensor] = []     # balanced statistics: the request's pseudo-labels, one pre-pass per step

        def forward(theta, x, features=False):
            if self.balanced and not labels:
                labels.append(self._pseudo_labels(theta, x, norm, source))
            logits, feats = self._forward(theta, x, features, norm, norm_sink,
                                          labels=labels[0] if labels else None)
            return logits, (None if feats is None else self._window_features(state, feats, window_sink))

        return forward

    @torch.no_grad()
    def _pseudo_labels(self, theta: torch.Tensor, x: torch.Tensor, norm: dict[str, torch.Tensor],
                       source: torch.Tensor | None = None) -> torch.Tensor:
        """Balanced statistics: the request's pseudo-labels, the predictions of a no-grad pre-pass with the adapted
        scalars ``theta`` and the stream's statistics ``norm`` as they are (not moved by the request). Later
        forwards of the same step (SAR's second pass, DeYO's shuffled images) reuse them. With the confidence gate
        (``bn_balanced_confidence``) an unconfident image's label is -1, with the agreement gate
        (``bn_balanced_agree``) one that differs from the source's (``source``: its logits of ``x``; from
        :meth:`_source_all`) (``StreamNormStats.pseudo_labels``)."""
        return self.norm.pseudo_labels(self._forward(theta.detach(), x, norm=norm, update_norm=False)[0], source)

    def _source_all(self, jobs: list[_Job]) -> None:
        """The agreement gate: the source model's logits of every image of each job's request (``job.source_all``),
        in one source forward for all of them (an image's source logits do not depend on its companions: the
        balanced statistics run in ``"ema"``); the guard's source checks reuse their first rows."""
        todo = [j for j in jobs if j.source_all is None]
        if not self.norm.agree or not todo:
            return
        logits = self.source_predict(torch.cat([j.x for j in todo]))   # timed with the phase that asks for it
        for job, part in zip(todo, logits.split([j.x.shape[0] for j in todo]), strict=True):
            job.source_all = part

    def _window_features(self, state: StreamState, live: torch.Tensor, window_sink: dict | None) -> torch.Tensor:
        """The features a feature-statistics loss sees: the request's ``live`` ones, behind the stream's recent
        ones when the engine keeps a feature window (see :meth:`_stream_forward`)."""
        if not self.feature_window:
            return live
        if window_sink is not None and "features" not in window_sink:
            window_sink["features"] = live.detach()
        k = min(int(state.tensors["window.count"]), max(0, self.update_images - live.shape[0]))
        if k == 0:
            return live
        scale = (k + live.shape[0]) / live.shape[0]
        live = live.detach() + scale * (live - live.detach())
        return torch.cat([state.tensors["window.features"][-k:], live])

    def _streams_forward(self, thetas: torch.Tensor, xs: torch.Tensor, norms: dict[str, torch.Tensor],
                         momenta: torch.Tensor, features: bool, sources: torch.Tensor | None = None):
        """One forward for S streams' requests of equal shape, row s with stream s's adapted scalars, statistics
        and update gate (see :meth:`_vmap_forward`): segment-wise norm layers where the model allows, else vmap.
        With balanced statistics a no-grad pre-pass of the same path (gates 0) gives each stream's pseudo-labels
        first, as :meth:`_pseudo_labels` does for one stream (``sources``: (S, n, K) the source model's logits of
        ``xs``, for the agreement gate)."""
        path = "segment" if self.segment_fused else "vmap"
        self.fused_forwards[path] += 1
        run = self._segment_forward if self.segment_fused else self._vmap_forward
        labels = None
        if self.balanced and norms:
            with torch.no_grad():
                zeros = torch.zeros_like(momenta)
                labels = self.norm.pseudo_labels(run(thetas.detach(), xs, norms, zeros, False)[0], sources)
        return run(thetas, xs, norms, momenta, features, labels)

    def _segment_forward(self, thetas: torch.Tensor, xs: torch.Tensor, norms: dict[str, torch.Tensor],
                         momenta: torch.Tensor, features: bool, labels: torch.Tensor | None = None):
        """:meth:`_vmap_forward`'s contract, as ONE plain forward of the S*N images: the frozen backbone is
        shared, only the segment layers (segments.py) normalise and apply affines per stream."""
        s, n = xs.shape[:2]
        x = xs.reshape(s * n, *xs.shape[2:])
        feats = None
        with self._lock, self.segments.use(thetas, norms, momenta, labels) as updates:
            if features:
                assert self.taps is not None
                with self.taps.collect() as sink:
                    logits = self.model(x)
                feats = FeatureTaps.concat(sink).reshape(s, n, -1)
            else:
                logits = self.model(x)
        return logits.reshape(s, n, -1), feats, dict(updates)

    def _vmap_forward(self, thetas: torch.Tensor, xs: torch.Tensor, norms: dict[str, torch.Tensor],
                      momenta: torch.Tensor, features: bool, labels: torch.Tensor | None = None):
        """One forward for S streams' requests of equal shape (``xs``: (S, N, C, H, W)), row s with the adapted
        scalars ``thetas[s]``, BatchNorm statistics ``norms[...][s]`` and update gate ``momenta[s]`` (1: the
        statistics move with the request's images, 0: they are not updated): ``torch.func.vmap`` over
        ``functional_call``, so every layer, BatchNorm's batch statistics and the feature taps included, sees one
        stream's images only. -> (logits (S, N, K), features (S, N, D) or
        None, the statistics' updates {name: (S, ...)})."""
        n = xs.shape[1]

        def one(theta, x, norm, m, *lab):
            with self.norm.use(norm, n, update=m, labels=lab[0] if lab else None) as updates:
                if not features:
                    return functional_call(self.model, self.spec.views(theta), (x,)), dict(updates)
                assert self.taps is not None
                with self.taps.collect() as sink:
                    logits = functional_call(self.model, self.spec.views(theta), (x,))
                return logits, FeatureTaps.concat(sink), dict(updates)

        with self._lock, self._unfused_attention():
            out = vmap(one)(thetas, xs, norms, momenta, *(() if labels is None else (labels,)))
        return (out[0], out[1], out[2]) if features else (out[0], None, out[1])

    @contextmanager
    def _unfused_attention(self) -> Iterator[None]:
        """timm attention layers that declare ``fused_attn`` run their explicit (matmul/softmax) path inside
        the block: vmap has no batching rule for the CPU's fused attention kernel and would loop over streams."""
        layers = [m for m in self._attention if m.fused_attn]
        for m in layers:
            m.fused_attn = False
        try:
            yield
        finally:
            for m in layers:
                m.fused_attn = True

    def _fused_pass(self, groups: list[list[_Job]], timer: Timer) -> None:
        """Phase 2 for many streams: per group (requests of one shape) one fused forward and the method's
        objectives of all its streams at once (``Method.objective_many``), then one backward for all (streams never
        interact, so row s of the gradient of the summed losses is stream s's gradient)."""
        pending: list[tuple[_Job, torch.Tensor, int, float, torch.Tensor, dict, int]] = []
        losses: list[torch.Tensor] = []
        with timer("forward"):
            for group in groups:
                done, loss = self._fused_group(group)
                pending += done
                if loss is not None:
                    losses.append(loss)
        if not pending:
            return
        stacks = list({id(p[1]): p[1] for p in pending}.values())
        with timer("backward"):
            grads = dict(zip((id(t) for t in stacks),
                             torch.autograd.grad(torch.cat(losses).sum(), stacks), strict=True))
        for job, thetas, row, loss_value, logits, updates, n_sel in pending:
            job.out = GradOutput(logits, loss_value, grads[id(thetas)][row], state_updates=updates,
                                 n_selected=n_sel)

    def _fused_group(self, group: list[_Job]) -> tuple[list, torch.Tensor | None]:
        """One fused forward for ``group`` (requests of one shape); no-gradient jobs and skipped steps get their
        output here, the others are returned with what :meth:`_fused_pass` needs to finish them, and their losses
        (stacked; None when there are none)."""
        grad = any(j.grad for j in group)
        norms = ({k: torch.stack([j.state.tensors[f"norm.{k}"] for j in group]) for k in self._source_norm}
                 if self.norm.per_stream else {})
        momenta = torch.tensor([1.0 if j.update_norm else 0.0 for j in group], dtype=torch.float64,
                               device=self.device)
        sources = None
        if self.balanced and self.norm.agree and norms:
            self._source_all(group)
            sources = torch.stack([j.source_all for j in group])    # type: ignore[misc]
        with torch.set_grad_enabled(grad):
            thetas = torch.stack([j.state.theta for j in group]).requires_grad_(grad)
            logits, feats, updates = self._streams_forward(thetas, torch.stack([j.x for j in group]), norms,
                                                           momenta, grad and self.method.needs_features, sources)
            rows = {k: v.detach().unbind(0) for k, v in updates.items()}   # one call per layer, not per stream
            for i, job in enumerate(group):
                job.norm_sink.update({k: r[i] for k, r in rows.items()})
                if not job.grad:
                    job.out = self._no_grad_output(job, logits[i])
            idx = [i for i, job in enumerate(group) if job.grad]
            if not idx:
                return [], None
            return self._fused_objectives(group, idx, thetas, logits, feats)

    def _fused_objectives(self, group: list[_Job], idx: list[int], thetas: torch.Tensor, logits: torch.Tensor,
                          feats: torch.Tensor | None) -> tuple[list, torch.Tensor | None]:
        """The method's objectives of the gradient jobs ``group[i]``, ``i`` in ``idx`` (rows of the group's
        forward), at once; one host read of the losses for all (a missing or non-finite loss skips the step, as
        ``loss_verdict`` does in ``step``)."""
        jobs = [group[i] for i in idx]
        rows = torch.tensor(idx, device=self.device) if len(idx) < len(group) else None
        sub_thetas = thetas if rows is None else thetas.index_select(0, rows)
        sub_logits = logits if rows is None else logits.index_select(0, rows)
        f = None if feats is None else [self._window_features(j.state, feats[i], j.window_sink)
                                        for i, j in zip(idx, jobs, strict=True)]
        obj = self.method.objective_many([self._context(j, _no_forward) for j in jobs], sub_thetas, sub_logits, f)
        values = obj.losses.detach().tolist()
        pending, keep = [], []
        for r, (i, job) in enumerate(zip(idx, jobs, strict=True)):
            out = logits[i].detach()
            if not obj.has_loss[r]:
                job.out = GradOutput(out, skipped_reason=SkipReason.NO_RELIABLE_SAMPLES)
            elif not math.isfinite(values[r]):
                job.out = GradOutput(out, loss=values[r], skipped_reason=SkipReason.NON_FINITE_LOSS)
            else:
                keep.append(r)
                pending.append((job, thetas, i, values[r], out, obj.state_updates[r], obj.selected[r]))
        if not keep:
            return pending, None
        losses = obj.losses if len(keep) == len(jobs) else obj.losses.index_select(
            0, torch.tensor(keep, device=obj.losses.device))
        return pending, losses

    @torch.no_grad()
    def predict(self, state: StreamState, x: torch.Tensor) -> torch.Tensor:
        """Logits with the stream's current state (statistics not updated)."""
        x = x.to(self.device)
        return self._forward(state.theta, x, norm=self._group(state, "norm"), update_norm=False)[0].cpu()

    @torch.no_grad()
    def source_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the source model (source parameters and statistics). Where the frozen model outside a
        statistics block *is* the source model (its parameters are ``theta0``, its BatchNorm layers read the
        source running statistics: ``StreamNormStats.source_outside_use``), one plain forward: no parameter swap,
        no statistics hooks (the guard's source checks of every step run it); else the stream path at source."""
        x = x.to(self.device)
        if self.norm.source_outside_use:
            with self._lock:
                return self.model(x)
        return self._forward(self.theta0, x, norm=self._source_norm, update_norm=False)[0]

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
        self._check_batch(x)
        job = self._begin(state, x, adapt)
        self._solo(job)
        self._apply([job])
        if self._plan_checks(job):
            self._source_checks([job], job.timer)
        self._observe([job])
        return self._finish(job)

    def step_many(self, items: Sequence[tuple[StreamState, torch.Tensor]], adapt: bool = True) -> list[StepResult]:
        """One step on each of several *distinct* streams: ``[step(state, x) for state, x in items]``, fused.

        Contract: each stream gets exactly the update, optimizer state, statistics, guard decisions and predictions
        it would get from :meth:`step` alone (within float rounding: 1e-5), whatever other streams share the call;
        results come back in the order of ``items``. A stream may appear at most once per call (its steps are
        ordered; the caller runs a second request of the same stream in a later call): ValueError, and no state
        changed, as for a malformed batch.

        Fused: the streams' requests of equal shape (never padded) run as one forward over their stacked adapted
        scalars, each stream normalised with its own images and BatchNorm statistics only: ONE plain batch through
        the shared backbone with segment-wise norm layers (:mod:`mgg_core.segments`) where every adapted layer
        type has a segment implementation (:attr:`segment_fused`), else a ``torch.func.vmap`` forward
        (:attr:`fused_forwards` counts both); each stream's ``objective`` on its rows, one backward for all (row s
        of the stacked gradient is stream s's); the objectives of a group at once (``Method.objective_many``), the
        guard's signals of all streams at once (``guard.observe_many``), one host read of what the per-stream steps
        branch on; the gradient window, optimizer, commit and the guard's judgement per stream; the guard's source
        checks of all streams in one source forward. A request alone in its shape, or of more than
        :attr:`fuse_max_images` images, and the gradient of a method or optimizer that is not ``fusable``
        (MGG: see ``Optimizer.fusable``), run as in :meth:`step` inside the call; engines whose model is not
        fusable (:func:`params.fusable_model`, ``EngineConfig.fused``) step the streams one by one.
        """
        seen: set[int] = set()
        for state, x in items:
            if id(state) in seen:
                raise ValueError("step_many: a stream appears more than once in one call")
            seen.add(id(state))
            self._check_batch(x)
        if not self.fused:
            return [self.step(state, x, adapt=adapt) for state, x in items]
        shared = Timer(self.device)
        jobs = [self._begin(state, x, adapt) for state, x in items]
        groups = _by_shape([j for j in jobs if (self.fuse_gradients or not j.grad)
                            and j.x.shape[0] <= self.fuse_max_images], lambda j: j.x)
        self._fused_pass([g for g in groups.values() if len(g) > 1], shared)
        for job in jobs:
            if job.out is None:     # alone in its shape, too large to gain, or a method that is not fusable
                self._solo(job)
        self._apply(jobs)
        self._source_checks([j for j in jobs if self._plan_checks(j)], shared)
        self._observe(jobs)
        results = []
        for job in jobs:
            for phase, sec in shared.times.items():
                job.timer.times[phase] = job.timer.times.get(phase, 0.0) + sec
            results.append(self._finish(job))
        return results

    @staticmethod
    def _check_batch(x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[0] == 0:
            raise ValueError(f"expected a non-empty batch (N, C, H, W), got shape {tuple(x.shape)}")

    def _begin(self, state: StreamState, x: torch.Tensor, adapt: bool) -> _Job:
        """Phase 1 of a step: the request's plan (a hold counts its images down here)."""
        state.last_seen = time.time()
        hold = float(state.tensors.get("guard.hold", torch.zeros(())))
        if hold > 0:   # the guard found the source better here: no adaptation (or statistics only) for a while
            state.tensors["guard.hold"] = torch.clamp(state.tensors["guard.hold"] - x.shape[0], min=0)
        # statistics keep adapting when not holding, or in a statistics-only hold (guard.py)
        update_norm = adapt and (hold <= 0 or float(state.tensors.get("guard.hold_stats", torch.zeros(()))) > 0)
        return _Job(state, x.to(self.device), Timer(self.device), adapt, hold,
                    grad=self.method.needs_grad and adapt and hold <= 0, update_norm=update_norm)

    def _no_grad_output(self, job: _Job, logits: torch.Tensor) -> GradOutput:
        reason = (self.method.no_update_reason if not self.method.needs_grad
                  else SkipReason.GUARD_HOLD if job.hold > 0 and job.adapt else SkipReason.ADAPTATION_DISABLED)
        return GradOutput(logits.detach(), skipped_reason=reason)

    def _context(self, job: _Job, forward) -> StepContext:
        state = job.state
        gen = torch.Generator().manual_seed((state.seed * 1_000_003 + state.batches) % (2 ** 63))
        return StepContext(x=job.x, theta=state.theta, theta0=self.theta0, state=self._group(state, "method"),
                           forward=forward, timer=job.timer, generator=gen, source_stats=self.source_stats)

    def _solo(self, job: _Job) -> None:
        """Phase 2 for one stream alone: the method's gradient, or one forward without gradient."""
        if job.grad:
            job.out = self._gradient_one(job)
            return
        if self.balanced and job.update_norm:
            self._source_all([job])
        with torch.no_grad(), job.timer("forward"):
            norm = self._group(job.state, "norm")
            labels = (self._pseudo_labels(job.state.theta, job.x, norm, job.source_all)
                      if self.balanced and job.update_norm else None)
            logits = self._forward(job.state.theta, job.x, norm=norm, norm_sink=job.norm_sink,
                                   update_norm=job.update_norm, labels=labels)[0]
        job.out = self._no_grad_output(job, logits)

    def _gradient_one(self, job: _Job) -> GradOutput:
        """Phase 2 for one stream: the method's own gradient (its forward passes, objective, backward)."""
        if self.balanced:
            self._source_all([job])
        return self.method.gradient(self._context(job, self._stream_forward(job.state, job.norm_sink,
                                                                            job.window_sink, job.source_all)))

    def _apply(self, jobs: list[_Job]) -> None:
        """Phase 3 for each job: the gradient window, the optimizer's update and the commit (or the no-gradient
        path's statistics); the step's result before the guard. What the per-stream steps branch on is read from
        the device once for all jobs (:meth:`_read_gradients`), and the results' entropies are computed on all
        jobs' logits at once."""
        self._read_gradients(jobs)
        for job in jobs:
            state = job.state
            if job.grad:
                job.adapted = self._update(job)
            elif job.update_norm:
                state.set_group("norm", job.norm_sink)
            state.batches += 1
            state.images += job.x.shape[0]
        outs = [j.out for j in jobs if j.out is not None]
        assert len(outs) == len(jobs)
        logits = [o.logits.detach() for o in outs]
        sizes = [t.shape[0] for t in logits]
        ent = (softmax_entropy(torch.cat(logits).float()) / math.log(self.num_classes)).clamp(0, 1)
        parts = ent.split(sizes)
        means = (ent.reshape(len(sizes), -1).mean(1) if len(set(sizes)) == 1
                 else torch.stack([e.mean() for e in parts])).tolist()
        cpu_logits, cpu_ent = torch.cat(logits).cpu().split(sizes), ent.cpu().split(sizes)
        for i, (job, out) in enumerate(zip(jobs, outs, strict=True)):
            job.logits = logits[i]
            job.result = StepResult(
                logits=cpu_logits[i], adapted=job.adapted, skipped_reason=out.skipped_reason, loss=out.loss,
                batch_entropy=means[i], sample_entropy=cpu_ent[i], n_selected=out.n_selected,
                step=job.state.step, timings=job.timer.times,
            )

    def _read_gradients(self, jobs: list[_Job]) -> None:
        """For the jobs with a gradient to apply: whether it is finite and how many images their gradient window
        already holds (``job.grad_finite``, ``job.pending``), in one host read for all of them."""
        todo = [j for j in jobs if j.grad and j.out is not None and j.out.skipped_reason is None
                and j.out.grad is not None]
        if not todo:
            return
        grads = [j.out.grad for j in todo if j.out is not None and j.out.grad is not None]
        zero = torch.zeros((), dtype=torch.int64, device=self.device)
        pending = [j.state.tensors.get("accum.images", zero).to(torch.int64) for j in todo]
        host = torch.cat([torch.isfinite(torch.stack(grads)).all(1).to(torch.int64), torch.stack(pending)]).tolist()
        for i, job in enumerate(todo):
            job.grad_finite, job.pending = bool(host[i]), int(host[len(todo) + i])

    def _finish(self, job: _Job) -> StepResult:
        """Phase 5: the guard's judgement and fallback, the method's reset request."""
        result, state = job.result, job.state
        assert result is not None and job.out is not None
        self._guard(job)
        self._warmup_on_shift(job)
        if job.out.request_reset and not result.rolled_back:
            self._to_source(state)
            state.resets += 1
            result.reset_reason = self.method.recovery_reason
        result.step = state.step
        return result

    def _update(self, job: _Job) -> bool:
        """The gradient accumulated over ``update_images`` images and the optimizer's update; commits the
        stream's state only when nothing was rejected. True when the stream took an update."""
        assert self.optimizer is not None and job.out is not None
        state, out, x = job.state, job.out, job.x
        raw = out.grad
        if out.skipped_reason is None and (raw is None or not job.grad_finite):
            out.skipped_reason = SkipReason.NON_FINITE_GRAD
        if out.skipped_reason is not None or raw is None:
            state.skipped += 1
            if out.skipped_reason in STATISTICS_DESPITE_SKIP and job.update_norm and job.norm_sink:
                state.set_group("norm", job.norm_sink)   # the images were seen: the statistics follow them
            return False
        grad, n = raw, x.shape[0]
        pending = job.pending
        if pending:
            grad = (state.tensors["accum.grad"] + n * grad) / (pending + n)
        commit = {"norm": job.norm_sink, "method": {k: v.detach() for k, v in out.state_updates.items()}}
        if pending + n < self.update_images:   # not enough images yet: accumulate, update later
            commit["accum"] = {"grad": state.tensors["accum.grad"] + n * raw,
                               "images": state.tensors["accum.images"] + n}
            self._commit(state, commit, job.window_sink)
            out.skipped_reason = SkipReason.ACCUMULATING
            return False
        with job.timer("optimizer"):
            new_theta, new_opt = self.optimizer.update(state.theta, grad, self._group(state, "opt"))
            new_theta = self.method.post_update(new_theta, self.theta0)   # e.g. ROID's weight ensembling
        if not bool(torch.isfinite(new_theta).all()):
            out.skipped_reason = SkipReason.NON_FINITE_UPDATE
            state.skipped += 1
            return False
        if "accum.grad" in state.tensors:
            commit["accum"] = {"grad": torch.zeros_like(state.tensors["accum.grad"]),
                               "images": torch.zeros_like(state.tensors["accum.images"])}
        commit["opt"] = {k: v.detach() for k, v in new_opt.items()}
        state.tensors["theta"] = new_theta.detach()
        self._commit(state, commit, job.window_sink)
        state.step += 1
        return True

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
    def _plan_checks(self, job: _Job) -> bool:
        """Phase 4: how many of the request's images the guard checks against the source (its credit moves)."""
        g = self.config.guard
        job.guard_sig = self._group(job.state, "guard")
        if g.enabled and self.method.needs_grad and g.check_share > 0:   # also while holding: source_failing()
            job.checks, job.guard_sig["credit"] = check_count(g, job.guard_sig, job.x.shape[0])
        return job.checks > 0

    def _source_checks(self, jobs: list[_Job], timer: Timer) -> None:
        """The source model's logits on each job's checked images, for many streams in one forward: concatenated
        where an image's logits do not depend on its companions, else one vmapped forward per request shape."""
        for job in jobs:        # the agreement gate's source forward of the whole request: its first rows
            if job.source_all is not None:
                job.source_logits = job.source_all[:job.checks]
        jobs = [j for j in jobs if j.source_logits is None]
        if not jobs:
            return
        with torch.no_grad(), timer("guard"):
            if len(jobs) == 1 or self.norm.images_independent:
                logits = self.source_predict(torch.cat([j.x[:j.checks] for j in jobs]))
                for job, part in zip(jobs, logits.split([j.checks for j in jobs]), strict=True):
                    job.source_logits = part
                return
            for group in _by_shape(jobs, lambda j: j.x[:j.checks]).values():
                if len(group) == 1:
                    group[0].source_logits = self.source_predict(group[0].x[:group[0].checks])
                    continue
                xs = torch.stack([j.x[:j.checks] for j in group])
                zeros = torch.zeros(len(group), dtype=torch.float64, device=self.device)
                logits = self._streams_forward(self.theta0.expand(len(group), -1), xs, {}, zeros, False)[0]
                for i, job in enumerate(group):
                    job.source_logits = logits[i]

    def _observe(self, jobs: list[_Job]) -> None:
        """Phase 5a: each job's guard signals after its request (``guard.observe_many``: the streams' requests of
        equal shape in one set of tensor ops), written to its state and kept in ``job.guard_sig``."""
        logits = [j.logits for j in jobs if j.logits is not None]      # set by _apply
        assert len(logits) == len(jobs)
        signals = observe_many(self.config.guard, [j.guard_sig for j in jobs], logits,
                               [j.source_logits for j in jobs], [j.x for j in jobs],
                               [j.hold > 0 and j.adapt for j in jobs])
        for job, sig in zip(jobs, signals, strict=True):
            job.state.set_group("guard", sig)
            job.guard_sig = sig

    def _guard(self, job: _Job) -> None:
        """Judge the stream's guard signals (guard.py; :meth:`_observe` updated them) and fall back when adaptation
        hurts: to the last healthy anchor, or to source when there is none (or a second fallback comes before a new
        anchor)."""
        g = self.config.guard
        state, result, n = job.state, job.result, job.x.shape[0]
        assert result is not None and job.logits is not None
        if not (g.enabled and self.method.needs_grad):
            return
        if float(state.tensors["guard.hold"]) > 0:
            release = hold_release(g, job.guard_sig)
            if release is not None:      # the source failing, or the domain the hold was for has gone
                state.tensors["guard.hold"] = torch.zeros_like(state.tensors["guard.hold"])
                state.tensors["guard.hold_stats"] = torch.zeros_like(state.tensors["guard.hold_stats"])
                if release is HoldRelease.DOMAIN_SHIFT:    # a new domain: its fallbacks start a new backoff
                    state.tensors["guard.backoff"] = torch.zeros_like(state.tensors["guard.backoff"])
                    if self.warmup_release:                 # and its statistics a warm-up from the source's
                        self._restart_warmup(state)
                result.hold_released = release
            elif float(state.tensors["guard.hold_stats"]) > 0:   # statistics-only hold: still judged
                reason = judge(g, job.guard_sig, state.images)
                if reason is not None:                           # the statistics hurt too: full source hold
                    self._fall_back(state, reason, result, statistics=False)
            return
        judged = n if g.judge_images is None else self._judge_due(state, n)  # images this judgement covers
        if not judged:
            return
        reason = judge(g, job.guard_sig, state.images)
        if reason is None:
            if result.adapted:
                before = state.healthy_streak
                state.healthy_streak += judged
                if state.healthy_streak // g.anchor_every_images > before // g.anchor_every_images:
                    state.tensors["guard.backoff"] = torch.zeros_like(state.tensors["guard.backoff"])
                    state.anchor = {k: v.clone() for k, v in state.tensors.items()}
                    state.anchor_step = state.step
            return
        self._fall_back(state, reason, result)

    def _warmup_on_shift(self, job: _Job) -> None:
        """``bn_warmup_shift``: restart the statistics warm-up (``norm.seen`` := 0) when the data moved to another
        domain. The stream keeps a slow EMA (``WARMUP_SLOW_IMAGES``) of the guard's pixel descriptor
        (:func:`guard.image_descriptor`) and of its square (``warm.slow``, ``warm.slow_sq``); a shift is some
        feature of the guard's fast EMA (``guard.shift_fast``) more than ``bn_warmup_shift`` slow standard deviations
        from the slow mean, outside a hold. Then the warm-up restarts and the slow reference restarts at the fast
        EMA; else the reference follows the request's images. Why: a request-size-independent merge gives a small
        request after a domain switch mostly the previous domain's statistics, where a large one is normalised
        mostly with its own (docs/results/smallbatch/README.md, session 5)."""
        state = job.state
        if self.warmup_shift is None or "warm.slow" not in state.tensors:
            return
        d = image_descriptor(job.x).double()
        mean, sq = d.mean(0), d.pow(2).mean(0)
        slow, slow_sq = state.tensors["warm.slow"], state.tensors["warm.slow_sq"]
        if bool(torch.isnan(slow).any()):
            state.tensors["warm.slow"], state.tensors["warm.slow_sq"] = mean, sq
            return
        fast = state.tensors["guard.shift_fast"].double()
        var = _slow_variance(state)
        if float(state.tensors["guard.hold"]) <= 0 and float(((fast - slow).abs() / var.sqrt()).max()) > \
                self.warmup_shift:
            self._restart_warmup(state)
            return
        keep = (1.0 - 1.0 / WARMUP_SLOW_IMAGES) ** d.shape[0]
        state.tensors["warm.slow"] = keep * slow + (1.0 - keep) * mean
        state.tensors["warm.slow_sq"] = keep * slow_sq + (1.0 - keep) * sq

    def _judge_due(self, state: StreamState, n: int) -> int:
        """``GuardConfig.judge_images``: the images since the last judgement, this request of ``n`` included, when
        the guard judges after it (outside holds), else 0. It judges once at least ``judge_images`` images arrived
        since its last judgement (``guard.since_judge``, zeroed then, before a fallback or an anchor copies the
        state); a healthy judgement adds all of them to the healthy streak, so anchors come every
        ``anchor_every_images`` images whatever the request size. The decision rate is per image, not per request:
        judged after every request, a 4-image stream tests the same 64-image EMAs 16 times as often as a 64-image
        one and catches transient threshold crossings that the large requests never see (held-out replay: more
        fallbacks at b4 than at b64; docs/results/smallbatch/README.md, session 6)."""
        since = state.tensors["guard.since_judge"] + n
        if float(since) < float(self.config.guard.judge_images or 0):
            state.tensors["guard.since_judge"] = since
            return 0
        state.tensors["guard.since_judge"] = torch.zeros_like(since)
        return int(since)

    def _restart_warmup(self, state: StreamState) -> None:
        """The statistics warm-up restarts (``norm.seen`` := 0): on a detected domain shift (``bn_warmup_shift``) or
        when a guard hold ends for one (``bn_warmup_release``: the statistics are the source's then, and the deep
        layers' own momenta would take the rest of a short domain to follow it). With ``bn_warmup_shift`` the slow
        descriptor reference restarts at the guard's fast EMA (keeping its variance), so a switch during a hold
        does not stay folded into the reference."""
        state.tensors["norm.seen"] = torch.zeros_like(state.tensors["norm.seen"])
        if "norm.cseen" in state.tensors:       # the class statistics' warm-up too
            state.tensors["norm.cseen"] = torch.zeros_like(state.tensors["norm.cseen"])
        slow = state.tensors.get("warm.slow")
        if slow is None or bool(torch.isnan(slow).any()):
            return
        fast = state.tensors["guard.shift_fast"].double()
        state.tensors["warm.slow"], state.tensors["warm.slow_sq"] = fast.clone(), fast.pow(2) + _slow_variance(state)

    def _fall_back(self, state: StreamState, reason: RollbackReason, result: StepResult,
                   statistics: bool = True) -> None:
        """Roll ``state`` back for ``reason`` (guard.py); ``statistics=False``: a statistics-only hold escalates to a
        full source hold."""
        result.rolled_back, result.rollback_reason = True, reason
        rollbacks = state.rollbacks + 1
        # like shift_fast, the warm-up's descriptor reference follows the data, not the model: kept; so does the
        # source's prediction history of guard.keep_source_history (absent when off)
        slow = {k: v for k, v in state.tensors.items() if k.startswith("warm.") or k == "guard.source_history"}
        held = float(state.tensors["guard.hold"]) > 0
        # the source is better here (or, guard.py collapse holds, adapting from it collapsed): back to it, and stay
        first = self.config.guard.hold_images if held else fallback_hold(self.config.guard, reason,
                                                                         state.anchor is not None)
        if first is not None:
            backoff = state.tensors["guard.backoff"] + 1
            fast = state.tensors["guard.shift_fast"]
            self._to_source(state)
            state.tensors["guard.backoff"] = backoff
            # the descriptor follows the data, not the model; the hold's reference starts empty (the source
            # state's shift_ref*), to be built from the hold's own first images
            state.tensors["guard.shift_fast"] = fast
            hold = hold_length(self.config.guard, state.group("guard"), first)
            state.tensors["guard.hold"] = torch.full_like(state.tensors["guard.hold"], hold)
            result.hold_images = hold
            # the first fallback in a row keeps the statistics adapting (guard.py: statistics-only holds); a
            # collapse hold never does (the statistics are what collapsed)
            stats_only = (statistics and self.config.guard.hold_statistics and self.norm.per_stream
                          and float(backoff) <= 1 and (reason in HOLD_REASONS or held))
            state.tensors["guard.hold_stats"] = torch.full_like(state.tensors["guard.hold_stats"], float(stats_only))
        elif state.anchor is not None:
            state.tensors = state.anchor
            state.step = state.anchor_step
            state.anchor = None                 # a second fallback before a new healthy anchor goes to source
        else:
            self._to_source(state)
        state.tensors.update(slow)
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
