"""TENT: mean prediction entropy."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..losses import softmax_entropy
from .base import Method, Objectives, register

__all__ = ["Tent"]


@register
@dataclass
class Tent(Method):
    """Mean prediction entropy (Wang et al. 2021)."""

    name: ClassVar[str] = "tent"
    order: ClassVar[int] = 2

    def objective(self, ctx, theta, logits, features):
        return softmax_entropy(logits).mean(), {}, logits.shape[0]

    def objective_many(self, ctxs, thetas, logits, features):
        rows, n, c = logits.shape
        losses = softmax_entropy(logits.reshape(rows * n, c)).reshape(rows, n).mean(1)
        return Objectives(losses, [True] * rows, [n] * rows, [{} for _ in range(rows)])
