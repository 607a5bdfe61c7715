"""COME: conservatively minimising entropy (Zhang, Bian, Kong, Zhao, Zhang; ICLR 2025).

A drop-in replacement of the entropy in entropy-minimisation TTA: the per-sample loss is the entropy of the model's
*opinion* (``losses.entropy_of_opinion``: beliefs plus an explicit uncertainty mass, with the logit norm held fixed),
so a step cannot lower the loss by inflating confidence alone. Here it replaces TENT's entropy (Tent-COME, the
paper's basic form); with ``e_margin`` set it also gets EATA's reliability filter on the opinion entropy and the
1/exp(H - E0) weights (EATA-COME without the redundancy filter and the Fisher term). Any optimizer (SGD, Adam, MGG)
turns its gradient into the update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..losses import entropy_of_opinion
from .base import Method, register

__all__ = ["COME"]


@register
@dataclass
class COME(Method):
    """Mean entropy of opinion over the batch (optionally filtered and weighted like EATA).

    Args:
        prior_mass: the Dirichlet prior mass K (default: the class count C, as the reference's K = 1000 on ImageNet).
        e_margin: None (no filter, Tent-COME) or a threshold in nats on the opinion entropy.
    """

    name: ClassVar[str] = "come"
    order: ClassVar[int] = 7
    prior_mass: float | None = None
    e_margin: float | None = None

    def objective(self, ctx, theta, logits, features):
        h = entropy_of_opinion(logits, self.prior_mass)
        if self.e_margin is None:
            return h.mean(), {}, logits.shape[0]
        keep = h < self.e_margin
        if not keep.any():
            return None, {}, 0
        coeff = torch.exp(-(h[keep].detach() - self.e_margin))
        return (h[keep] * coeff).mean(), {}, int(keep.sum())
