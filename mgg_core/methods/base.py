"""The TTA method interface, its registry and ``build_method``; one module per method beside this one.

A method turns a test batch into a gradient for the adapted scalars (its loss, its sample filter, its extra
passes); the optimizer (``optim.py``) turns that gradient into an update. So TENT + MGG, FOA + MGG (= MGTTA) and
SAR + SGD are all the same engine with different parts.

Contract for a method module: define a ``Method`` subclass, declare its capabilities as class variables (the
engine, the bench and the service read them; nobody compares names) and decorate it with ``@register``. The package
imports every module in it, so adding a method is one file (plus its test).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from ..reasons import ResetReason, SkipReason
from ..registry import Registry

__all__ = ["METHODS", "GradOutput", "Method", "MethodState", "Objectives", "StepContext", "Timer", "build_method",
           "loss_verdict", "register", "resolved"]

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
    skipped_reason: SkipReason | None = None
    state_updates: MethodState = field(default_factory=dict)
    n_selected: int = 0
    request_reset: bool = False


@dataclass
class Objectives:
    """The objectives of S streams' requests of one shape (:meth:`Method.objective_many`), row s = stream s."""

    losses: torch.Tensor                     # (S,): stream s's loss; any value where not has_loss[s]
    has_loss: list[bool]                     # False: no sample qualified (the stream's step is skipped)
    selected: list[int]                      # images each stream's loss selected
    state_updates: list[MethodState]


@dataclass
class Method:
    """Base class. Subclasses set the class variables and implement ``objective`` (or override ``gradient``)."""

    # ---- capabilities, declared as data and read by the engine, the bench and the service (never name checks)
    name: ClassVar[str] = ""
    order: ClassVar[int] = 100               # position in the registry (bench lists, tables, CLI choices)
    needs_grad: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    uses_source_stats: ClassVar[bool] = False  # takes FOA's clean source feature statistics (engine source_stats=)
    uses_fisher: ClassVar[bool] = False      # takes a diagonal Fisher from clean data (engine fisher=)
    requires_batchnorm: ClassVar[bool] = False  # meaningful only for models with BatchNorm layers
    bn_stats: ClassVar[str] = "batch"        # "batch": BatchNorm uses test-batch statistics; "source": running stats
    default_optimizer: ClassVar[str | None] = "sgd"
    reference_lr: ClassVar[float | None] = 1e-3  # reference step size (ViT-B/16 / ResNet-50, batch 64); None: no step
    no_update_reason: ClassVar[SkipReason | None] = None   # skipped_reason reported by methods that never update
    recovery_reason: ClassVar[ResetReason | None] = None   # reset_reason when the method asks for a reset
    # its gradient is this base class's ``gradient`` (one forward, ``objective``, one backward) and ``objective``
    # runs no forward pass of its own: the engine may then compute it for many streams in one fused pass
    # (``AdaptationEngine.step_many``); False (SAR's second pass, DeYO's shuffled pass, ROID's augmented pass):
    # step_many runs the method's own ``gradient`` per stream
    fusable: ClassVar[bool] = True

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

    def post_update(self, theta: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        """The adapted scalars to commit after the optimizer's step (default: the step's result unchanged; ROID
        merges them with the source ones). ``theta0``: the source values."""
        return theta

    def objective(self, ctx: StepContext, theta: torch.Tensor, logits: torch.Tensor, features):
        """-> (loss or None when no sample qualifies, state_updates, n_selected)."""
        raise NotImplementedError

    def objective_many(self, ctxs: Sequence[StepContext], thetas: torch.Tensor, logits: torch.Tensor,
                       features: Sequence[torch.Tensor] | None) -> Objectives:
        """:meth:`objective` for S streams' requests of equal shape at once (``ctxs[s]``, ``thetas[s]`` (S, numel),
        ``logits[s]`` (S, N, C), ``features[s]``: stream s's), for the engine's fused pass. Row s must equal
        ``objective(ctxs[s], thetas[s], logits[s], features[s])`` within float rounding, with the gradient reaching
        ``thetas`` only through row s (a subclass overrides this with tensor ops over the rows, and a test checks
        it against ``objective``). Default: ``objective`` per stream."""
        losses, has, selected, updates = [], [], [], []
        for s, ctx in enumerate(ctxs):
            loss, upd, n = self.objective(ctx, thetas[s], logits[s], None if features is None else features[s])
            losses.append(logits.new_zeros(()) if loss is None else loss)
            has.append(loss is not None)
            selected.append(n)
            updates.append(upd)
        return Objectives(torch.stack(losses), has, selected, updates)

    def gradient(self, ctx: StepContext) -> GradOutput:
        theta = ctx.theta.detach().requires_grad_(True)
        with ctx.timer("forward"):
            logits, feats = ctx.forward(theta, ctx.x, self.needs_features)
            loss, updates, n = self.objective(ctx, theta, logits, feats)
        skipped = loss_verdict(logits, loss)
        if skipped is not None or loss is None:
            return skipped or GradOutput(logits.detach(), skipped_reason=SkipReason.NO_RELIABLE_SAMPLES)
        with ctx.timer("backward"):
            (grad,) = torch.autograd.grad(loss, theta)
        return GradOutput(logits.detach(), float(loss.detach()), grad, state_updates=updates, n_selected=n)


def loss_verdict(logits: torch.Tensor, loss: torch.Tensor | None) -> GradOutput | None:
    """The skipped step's output when ``objective`` gave no loss or a non-finite one, else None (take its
    gradient). Shared by :meth:`Method.gradient` and the engine's fused pass."""
    if loss is None:
        return GradOutput(logits.detach(), skipped_reason=SkipReason.NO_RELIABLE_SAMPLES)
    if not torch.isfinite(loss):
        return GradOutput(logits.detach(), loss=float(loss.detach()), skipped_reason=SkipReason.NON_FINITE_LOSS)
    return None


def resolved(value: float | None) -> float:
    """A class-count dependent hyper-parameter that ``__post_init__`` filled in (never None after construction)."""
    if value is None:
        raise RuntimeError("hyper-parameter read before __post_init__ resolved it")
    return value


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add a method to :data:`METHODS` under ``cls.name`` (a duplicate name raises)."""
    METHODS.add(cls.name, cls)
    return cls


def build_method(name: str, num_classes: int, **kwargs) -> Method:
    """A configured method.

    Args:
        name: a registered method name (case-insensitive).
        num_classes: the classifier's class count (class-count dependent defaults scale with it).
        **kwargs: the method's hyper-parameters (its dataclass fields); unknown ones raise ``ValueError``.
    """
    cls = METHODS.get(name)
    key = cls.name
    allowed = {f.name for f in fields(cls)} - {"num_classes"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"method {key!r} has no hyper-parameter(s) {sorted(unknown)}; it has {sorted(allowed)}")
    return cls(num_classes=num_classes, **kwargs)
