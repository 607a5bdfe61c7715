"""EATA: reliable, non-redundant samples, entropy-weighted, with a Fisher regulariser."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..losses import softmax_entropy
from .base import Method, Objectives, register, resolved

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

    def objective_many(self, ctxs, thetas, logits, features):
        """:meth:`objective` over S streams' rows at once: the filter as masks, the selected means as masked sums,
        one host read (the selected counts) for all streams."""
        rows, n, c = logits.shape
        e_margin = resolved(self.e_margin)
        ent = softmax_entropy(logits.reshape(rows * n, c)).reshape(rows, n)
        probs = logits.softmax(2).detach()
        mean_probs = torch.stack([ctx.state["mean_probs"] for ctx in ctxs])
        flags = torch.stack([ctx.state["mean_probs_set"] for ctx in ctxs])
        is_set = flags > 0
        cos = F.cosine_similarity(mean_probs.unsqueeze(1), probs, dim=2)
        keep = (ent < e_margin) & (~is_set.unsqueeze(1) | (cos.abs() < resolved(self.d_margin)))
        count = keep.sum(1)
        denom = count.clamp(min=1)
        sel_probs = torch.where(keep.unsqueeze(2), probs, 0.0).sum(1) / denom.unsqueeze(1)
        new_mean = torch.where(is_set.unsqueeze(1),
                               self.prob_momentum * mean_probs + (1 - self.prob_momentum) * sel_probs, sel_probs)
        coeff = torch.exp(-(ent.detach() - e_margin))
        losses = torch.where(keep, ent * coeff, 0.0).sum(1) / denom
        if self.fisher is not None and self.fisher_alpha:
            losses = losses + self.fisher_alpha * (self.fisher * (thetas - ctxs[0].theta0) ** 2).sum(1)
        selected = count.tolist()
        ones = torch.ones_like(flags).unbind(0)
        updates = [{"mean_probs": new_mean[s], "mean_probs_set": ones[s]} if selected[s] else {}
                   for s in range(rows)]
        return Objectives(losses, [k > 0 for k in selected], selected, updates)
