"""EATA: reliable, non-redundant samples, entropy-weighted, with a Fisher regulariser."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..losses import softmax_entropy
from .base import Method, register, resolved

__all__ = ["EATA"]


@register
@dataclass
class EATA(Method):
    """Reliable (entropy < E0) and non-redundant (cosine to the stream's mean prediction < eps) samples, weighted by
    1/exp(H - E0), plus an optional Fisher regulariser towards the source (Niu et al. 2022)."""

    name: ClassVar[str] = "eata"
    order: ClassVar[int] = 3
    uses_fisher: ClassVar[bool] = True
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
        reliable = ent < resolved(self.e_margin)
        probs = logits.softmax(1).detach()
        mean_probs, is_set = ctx.state["mean_probs"], bool(ctx.state["mean_probs_set"] > 0)
        keep = reliable.clone()
        if is_set and reliable.any():
            cos = F.cosine_similarity(mean_probs.unsqueeze(0), probs, dim=1)
            keep = reliable & (cos.abs() < resolved(self.d_margin))
        if not keep.any():
            return None, {}, 0
        sel_probs = probs[keep].mean(0)
        new_mean = self.prob_momentum * mean_probs + (1 - self.prob_momentum) * sel_probs if is_set else sel_probs
        coeff = torch.exp(-(ent[keep].detach() - resolved(self.e_margin)))
        loss = (ent[keep] * coeff).mean()
        if self.fisher is not None and self.fisher_alpha:
            loss = loss + self.fisher_alpha * (self.fisher * (theta - ctx.theta0) ** 2).sum()
        updates = {"mean_probs": new_mean, "mean_probs_set": torch.ones_like(ctx.state["mean_probs_set"])}
        return loss, updates, int(keep.sum())
