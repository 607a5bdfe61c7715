"""SAR: reliable entropy minimisation with sharpness-aware steps and model recovery."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..losses import softmax_entropy
from ..reasons import ResetReason, SkipReason
from .base import GradOutput, Method, register, resolved

__all__ = ["SAR"]


@register
@dataclass
class SAR(Method):
    """Reliable entropy minimisation with sharpness-aware steps and entropy-EMA model recovery (Niu et al. 2023).

    The gradient is taken at theta + rho g/||g|| (SAM) and applied at theta by the optimizer.
    """

    name: ClassVar[str] = "sar"
    fusable: ClassVar[bool] = False          # second (SAM) forward
    order: ClassVar[int] = 4
    recovery_reason: ClassVar[ResetReason | None] = ResetReason.SAR_RECOVERY
    e_margin: float | None = None            # default 0.4 ln C
    rho: float = 0.05
    reset_constant: float | None = None      # default 0.2 ln C / ln 1000
    ema_momentum: float = 0.9

    def __post_init__(self):
        if self.e_margin is None:
            self.e_margin = 0.4 * self.ln_c
        if self.reset_constant is None:
            self.reset_constant = 0.2 * self.ln_c / math.log(1000.0)

    def init_state(self, device):
        return {"loss_ema": torch.full((), float("nan"), device=device)}

    def gradient(self, ctx):
        theta = ctx.theta.detach().requires_grad_(True)
        with ctx.timer("forward"):
            logits, _ = ctx.forward(theta, ctx.x, False)
            ent = softmax_entropy(logits)
            sel1 = ent < resolved(self.e_margin)
        if not sel1.any():
            return GradOutput(logits.detach(), skipped_reason=SkipReason.NO_RELIABLE_SAMPLES)
        loss1 = ent[sel1].mean()
        if not torch.isfinite(loss1):
            return GradOutput(logits.detach(), loss=float(loss1.detach()), skipped_reason=SkipReason.NON_FINITE_LOSS)
        with ctx.timer("backward"):
            (g1,) = torch.autograd.grad(loss1, theta)
        if not torch.isfinite(g1).all():
            return GradOutput(logits.detach(), loss=float(loss1.detach()), skipped_reason=SkipReason.NON_FINITE_GRAD)
        theta_adv = (theta.detach() + self.rho * g1 / (g1.norm() + 1e-12)).requires_grad_(True)
        with ctx.timer("forward"):
            logits2, _ = ctx.forward(theta_adv, ctx.x, False)
            ent2 = softmax_entropy(logits2)[sel1]
            sel2 = ent2 < resolved(self.e_margin)
        if not sel2.any():
            return GradOutput(logits.detach(), loss=float(loss1.detach()),
                              skipped_reason=SkipReason.NO_RELIABLE_SAMPLES)
        loss2 = ent2[sel2].mean()
        if not torch.isfinite(loss2):
            return GradOutput(logits.detach(), loss=float(loss2.detach()), skipped_reason=SkipReason.NON_FINITE_LOSS)
        with ctx.timer("backward"):
            (grad,) = torch.autograd.grad(loss2, theta_adv)
        old = ctx.state["loss_ema"]
        ema = loss2.detach() if torch.isnan(old) else self.ema_momentum * old + (1 - self.ema_momentum) * loss2.detach()
        return GradOutput(logits.detach(), float(loss2.detach()), grad, state_updates={"loss_ema": ema},
                          n_selected=int(sel2.sum()), request_reset=bool(ema < resolved(self.reset_constant)))
