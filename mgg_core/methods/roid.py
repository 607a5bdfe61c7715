"""ROID: certainty- and diversity-weighted soft-likelihood-ratio TTA (Marsden, Döbler, Yang; WACV 2024).

Per batch (N samples, C classes), with p = softmax(z) of the forward pass before the update and the stream's EMA
of mean predictions p_bar (starts uniform, momentum 0.9):

* diversity weight  w_div = 1 - cos(p_bar, p_n), min-max normalised over the batch; samples with w_div below the
  batch mean are dropped (mask);
* certainty weight  w_cert = -H(p_n), min-max normalised;  w = exp(w_div * w_cert / T), T = 1/3;
* loss = [sum_{kept} w_n SLR(z_n) + sum_{kept} w_n SCE(z_aug_n, z_n)] / N, with SLR the soft likelihood ratio
  (``losses.soft_likelihood_ratio``) and SCE the symmetric cross-entropy between an augmented view
  (random affine: +-15 deg, 1/16 translation, 0.9-1.1 scale, reflect padding) and the original;
* after the optimizer step, weight ensembling: theta <- 0.99 theta + 0.01 theta_source (``post_update``);
* prediction returned: prior-corrected, p_n * prior / sum_k(...) with the smoothed batch prior
  (``losses.smoothed_prior``), as log-probabilities.

Differences from the public code (mariodoebler/test-time-adaptation), on purpose: the prior correction multiplies the
*probabilities* as the paper writes it (the code multiplies the logits); the horizontal flip of the augmentation is
off by default (``hflip``) because digits are not mirror-symmetric. The optimizer is the engine's (any of SGD, Adam,
MGG), the adapted parameters the norm layers' affine ones as everywhere else.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..losses import smoothed_prior, soft_likelihood_ratio, symmetric_cross_entropy
from ..reasons import SkipReason
from .base import GradOutput, Method, register

__all__ = ["ROID", "random_affine", "roid_weights"]


def _minmax(v: torch.Tensor) -> torch.Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if float(span) > 0 else torch.zeros_like(v)


def roid_weights(probs: torch.Tensor, probs_ema: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (N,), keep mask (N,)) of ROID's certainty/diversity weighting for a batch of probabilities."""
    w_div = _minmax(1 - F.cosine_similarity(probs_ema.unsqueeze(0), probs, dim=1))
    keep = ~(w_div < w_div.mean())
    w_cert = _minmax((probs * probs.clamp_min(1e-30).log()).sum(1))      # -H(p)
    w = torch.exp(w_div * w_cert / temperature)
    return torch.where(keep, w, torch.zeros_like(w)), keep


def random_affine(x: torch.Tensor, generator: torch.Generator | None, degrees: float = 15.0, translate: float = 1 / 16,
                  scale: tuple[float, float] = (0.9, 1.1), hflip: bool = False) -> torch.Tensor:
    """One random affine view per image (reflect padding), drawn from ``generator`` (CPU)."""
    n = x.shape[0]
    r = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    ang = (r[:, 0] * 2 - 1) * math.radians(degrees)
    s = scale[0] + r[:, 1] * (scale[1] - scale[0])
    t = (r[:, 2:4] * 2 - 1) * 2 * translate                 # in [-1, 1] grid units
    f = torch.where(r[:, 4] < 0.5, -1.0, 1.0) if hflip else torch.ones(n, dtype=torch.float64)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    mat = torch.stack([torch.stack([cos * f, -sin, t[:, 0]], 1), torch.stack([sin * f, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(mat.to(x.dtype).to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@register
@dataclass
class ROID(Method):
    """ROID behind the common interface (loss + filter here, step by the engine's optimizer, then ``post_update``).

    Args:
        temperature: T of the weights (1/3).  momentum_probs: EMA of mean predictions (0.9).
        momentum_src: weight ensembling, theta <- m theta + (1 - m) theta_source (0.99; 1 disables it).
        clip: SLR probability clip (0.99).  consistency / prior_correction / weighting: the three parts (all on).
        hflip: random horizontal flips in the augmented view (off: digits are not mirror-symmetric).
    """

    name: ClassVar[str] = "roid"
    fusable: ClassVar[bool] = False          # augmented forward in its own gradient
    order: ClassVar[int] = 8
    temperature: float = 1 / 3
    momentum_probs: float = 0.9
    momentum_src: float = 0.99
    clip: float = 0.99
    consistency: bool = True
    prior_correction: bool = True
    weighting: bool = True
    hflip: bool = False

    def init_state(self, device):
        return {"probs_ema": torch.full((self.num_classes,), 1.0 / self.num_classes, device=device)}

    def post_update(self, theta: torch.Tensor, theta0: torch.Tensor) -> torch.Tensor:
        return self.momentum_src * theta + (1 - self.momentum_src) * theta0

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        """Prior-corrected log-probabilities (or the logits unchanged)."""
        if not self.prior_correction:
            return logits
        probs = logits.softmax(1)
        corrected = probs * smoothed_prior(probs)
        return (corrected / corrected.sum(1, keepdim=True)).log()

    def gradient(self, ctx):
        theta = ctx.theta.detach().requires_grad_(True)
        n = ctx.x.shape[0]
        with ctx.timer("forward"):
            logits, _ = ctx.forward(theta, ctx.x, False)
            probs = logits.detach().softmax(1)
            if self.weighting:
                w, keep = roid_weights(probs, ctx.state["probs_ema"], self.temperature)
            else:
                w, keep = torch.ones(n, device=logits.device), torch.ones(n, dtype=torch.bool, device=logits.device)
            ema = self.momentum_probs * ctx.state["probs_ema"] + (1 - self.momentum_probs) * probs.mean(0)
            loss = (soft_likelihood_ratio(logits[keep], self.clip) * w[keep]).sum() / n
            if self.consistency and keep.any():
                x_aug = random_affine(ctx.x[keep], ctx.generator, hflip=self.hflip)
                logits_aug, _ = ctx.forward(theta, x_aug, False)
                loss = loss + (symmetric_cross_entropy(logits_aug, logits[keep]) * w[keep]).sum() / n
        shown = self.predictions(logits.detach())
        if not torch.isfinite(loss):
            return GradOutput(shown, loss=float(loss.detach()), skipped_reason=SkipReason.NON_FINITE_LOSS)
        with ctx.timer("backward"):
            (grad,) = torch.autograd.grad(loss, theta)
        return GradOutput(shown, float(loss.detach()), grad, state_updates={"probs_ema": ema},
                          n_selected=int(keep.sum()))
