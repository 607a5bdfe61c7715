"""Functional optimizers on a flat parameter vector: SGD (momentum), Adam and MGG.

An optimizer never mutates its inputs: ``update(theta, grad, state) -> (theta', state')``. The engine commits
the result only after checking it, so a rejected step leaves the stream exactly as it was.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from .mgg import GradientMemoryLayer
from .registry import Registry

__all__ = ["MGG", "OPTIMIZERS", "SGD", "Adam", "OptState", "OptimInfo", "Optimizer", "build_optimizer", "mgg_card",
           "mgg_tokens", "register_optimizer"]

OptState = dict[str, torch.Tensor]


class Optimizer:
    name: ClassVar[str]
    lr: float
    #: the update keeps float rounding of the gradient at float rounding, so ``AdaptationEngine.step_many`` may
    #: compute the gradient in a fused (vmapped) pass, whose kernels round differently (~1e-7 relative); False:
    #: step_many takes each stream's gradient as step() does (exact)
    fusable: ClassVar[bool] = True

    def init_state(self, theta: torch.Tensor) -> OptState:
        raise NotImplementedError

    def update(self, theta: torch.Tensor, grad: torch.Tensor, state: OptState) -> tuple[torch.Tensor, OptState]:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "lr": self.lr}


@dataclass
class SGD(Optimizer):
    """torch.optim.SGD semantics (dampening 0, no Nesterov)."""

    name: ClassVar[str] = "sgd"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0

    def init_state(self, theta):
        return {"momentum_buffer": torch.zeros_like(theta)} if self.momentum else {}

    def update(self, theta, grad, state):
        g = grad + self.weight_decay * theta if self.weight_decay else grad
        if not self.momentum:
            return theta - self.lr * g, {}
        buf = self.momentum * state["momentum_buffer"] + g
        return theta - self.lr * buf, {"momentum_buffer": buf}

    def describe(self):
        return {"name": self.name, "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}


@dataclass
class Adam(Optimizer):
    """torch.optim.Adam semantics."""

    name: ClassVar[str] = "adam"
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init_state(self, theta):
        return {"exp_avg": torch.zeros_like(theta), "exp_avg_sq": torch.zeros_like(theta),
                "step": torch.zeros((), dtype=torch.float64, device=theta.device)}

    def update(self, theta, grad, state):
        step = state["step"] + 1
        m = self.beta1 * state["exp_avg"] + (1 - self.beta1) * grad
        v = self.beta2 * state["exp_avg_sq"] + (1 - self.beta2) * grad * grad
        t = float(step)
        bc1 = 1 - self.beta1 ** t
        bc2 = 1 - self.beta2 ** t
        denom = v.sqrt() / (bc2 ** 0.5) + self.eps
        return theta - (self.lr / bc1) * m / denom, {"exp_avg": m, "exp_avg_sq": v, "step": step}

    def describe(self):
        return {"name": self.name, "lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps}


def mgg_tokens(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, beta1: float = 0.9,
               beta2: float = 0.99, eps: float = 1e-8, bias_correction_offset: int = 1):
    """Adam-style moments and the 2-number token per scalar.

    Returns (token (N, 2), m', v'). ``step`` is the 1-based index of this update; the reference code bias-corrects
    with exponent step + 1 (``bias_correction_offset=1``); 0 gives Adam's own correction.
    """
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    e = step + bias_correction_offset
    m_hat = m / (1 - beta1 ** e)
    v_hat = v / (1 - beta2 ** e)
    denom = torch.sqrt(v_hat) + eps
    return torch.stack([m_hat / denom, grad / denom], dim=-1), m, v


class MGG(Optimizer):
    """The learned optimizer: moments -> token -> gradient memory layer -> theta - alpha * u."""

    name: ClassVar[str] = "mgg"
    # its memory is fed per-scalar normalised tokens (m / (sqrt(v) + eps)): on scalars with ~1e-8 gradients it turns
    # 1e-7 rounding into 1e-3 (memory) and 1e-4 (theta, 2 steps at the card's lr 0.01): docs/results/fused/README.md
    fusable: ClassVar[bool] = False

    def __init__(self, gml: GradientMemoryLayer, lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.99,
                 eps: float = 1e-8, bias_correction_offset: int = 1, checkpoint: str | None = None):
        self.gml = gml
        self.lr = lr
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.bias_correction_offset = bias_correction_offset
        self.checkpoint = checkpoint
        for p in self.gml.parameters():
            p.requires_grad_(False)

    def init_state(self, theta, memory_in_graph: bool = False):
        W, b = self.gml.initial_memory(theta.numel(), device=theta.device, dtype=theta.dtype,
                                       in_graph=memory_in_graph)
        z = torch.zeros_like(theta)
        step = torch.zeros((), dtype=torch.float64, device=theta.device)
        return {"exp_avg": z, "exp_avg_sq": z.clone(), "step": step, "memory_W": W, "memory_b": b}

    def direction(self, grad: torch.Tensor, state: OptState, detach_memory: bool = True):
        """(u, new state) without applying it; differentiable in the GML's weights when grad mode is on.
        ``detach_memory=False`` keeps the carried memory in the graph (meta-training unrolls longer than one)."""
        step = state["step"] + 1
        x, m, v = mgg_tokens(grad, state["exp_avg"], state["exp_avg_sq"], int(step), self.beta1, self.beta2,
                             self.eps, self.bias_correction_offset)
        u, W, b = self.gml(x, state["memory_W"], state["memory_b"])
        if detach_memory:
            W, b = W.detach(), b.detach()
        return u, {"exp_avg": m, "exp_avg_sq": v, "step": step, "memory_W": W, "memory_b": b}

    def update(self, theta, grad, state):
        with torch.no_grad():
            u, new_state = self.direction(grad, state)
        return theta - self.lr * u, new_state

    def describe(self):
        return {"name": self.name, "lr": self.lr, "betas": [self.beta1, self.beta2], "eps": self.eps,
                "bias_correction_offset": self.bias_correction_offset, "hidden": self.gml.hidden,
                "checkpoint": self.checkpoint}


def mgg_card(checkpoint: str | os.PathLike) -> dict:
    """The JSON card beside an MGG checkpoint ({} when there is none)."""
    card = Path(checkpoint).with_suffix(".json")
    return json.loads(card.read_text()) if card.is_file() else {}


def _load_mgg(lr: float, checkpoint: str | Path | None, device, **kwargs) -> MGG:
    if checkpoint is None:                    # build_optimizer checks needs_checkpoint first
        raise ValueError("optimizer 'mgg' needs an MGG checkpoint")
    gml = GradientMemoryLayer.load(checkpoint, device=device)
    return MGG(gml, lr=lr, checkpoint=str(checkpoint), **kwargs)


@dataclass(frozen=True)
class OptimInfo:
    """An optimizer's entry in :data:`OPTIMIZERS`: how to build it and what it needs, as data.

    ``factory(lr=, checkpoint=, device=, **kwargs)`` builds it. ``needs_checkpoint``: it loads learned weights
    (``mgg_checkpoint``); ``lr_from_checkpoint_card``: ``lr=None`` takes the card's deployment step;
    ``loss_from_checkpoint_card``: it is deployed with the loss hyper-parameters recorded in its card;
    ``bench_method``: ``mgg bench`` lists it as a method of its own name (this loss + this optimizer);
    ``highlight``: drawn bold in the bench plot (the project's own optimizer)."""

    name: str
    factory: Callable[..., Optimizer]
    default_lr: float = 1e-3
    needs_checkpoint: bool = False
    lr_from_checkpoint_card: bool = False
    loss_from_checkpoint_card: bool = False
    bench_method: str | None = None
    highlight: bool = False
    description: str = ""


OPTIMIZERS: Registry[OptimInfo] = Registry("optimizer")


def register_optimizer(info: OptimInfo) -> OptimInfo:
    """Add an optimizer to :data:`OPTIMIZERS` (a duplicate name raises ``ValueError``)."""
    return OPTIMIZERS.add(info.name, info)


register_optimizer(OptimInfo("sgd", lambda lr, checkpoint, device, **kw: SGD(lr=lr, **kw),
                             description="SGD with momentum (torch.optim.SGD semantics)"))
register_optimizer(OptimInfo("adam", lambda lr, checkpoint, device, **kw: Adam(lr=lr, **kw),
                             description="Adam (torch.optim.Adam semantics)"))
register_optimizer(OptimInfo("mgg", _load_mgg, needs_checkpoint=True, lr_from_checkpoint_card=True,
                             loss_from_checkpoint_card=True, bench_method="foa", highlight=True,
                             description="the learned optimizer (gradient memory layer)"))


def build_optimizer(name: str, lr: float | None, mgg_checkpoint: str | Path | None = None, device=None,
                    default_lr: float = 1e-3, **kwargs) -> Optimizer:
    """A configured optimizer.

    Args:
        name: a registered optimizer name (case-insensitive).
        lr: step size; ``None`` takes the step recorded for deployment in the checkpoint's card (the one its
            checkpoint selection validated) where the optimizer has one, else ``default_lr``.
        mgg_checkpoint: learned weights, for optimizers that need them (``OptimInfo.needs_checkpoint``).
        device: where learned weights are loaded.
        default_lr: the step when ``lr`` is None and no card gives one.
        **kwargs: the optimizer's own hyper-parameters.
    """
    info = OPTIMIZERS.get(name)
    if info.needs_checkpoint and mgg_checkpoint is None:
        raise ValueError(f"optimizer {info.name!r} needs an MGG checkpoint (mgg_checkpoint=...); "
                         "train one with `mgg pretrain`")
    if lr is None and info.lr_from_checkpoint_card and mgg_checkpoint is not None:
        lr = float(mgg_card(mgg_checkpoint).get("deployment", {}).get("lr", default_lr))
    return info.factory(lr=default_lr if lr is None else lr, checkpoint=mgg_checkpoint, device=device, **kwargs)
