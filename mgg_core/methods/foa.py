"""FOA loss: entropy + feature-statistics discrepancy against clean source statistics (the MGTTA loss)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..losses import feature_discrepancy, softmax_entropy
from .base import Method, register

__all__ = ["FOALoss"]


@register
@dataclass
class FOALoss(Method):
    """Entropy + FOA's feature-statistics discrepancy against clean source statistics (the MGTTA loss)."""

    name: ClassVar[str] = "foa"
    order: ClassVar[int] = 6
    uses_source_stats: ClassVar[bool] = True
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
