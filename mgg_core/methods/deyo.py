"""DeYO: entropy and PLPD (patch-shuffle confidence drop) filters and weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..losses import softmax_entropy
from .base import Method, register, resolved

__all__ = ["DeYO", "patch_shuffle"]


def patch_shuffle(x: torch.Tensor, grid: int, generator: torch.Generator | None) -> torch.Tensor:
    """Cut each image into grid x grid patches and permute them (one random permutation per image)."""
    n, c, h, w = x.shape
    hs, ws = (h // grid) * grid, (w // grid) * grid
    xr = F.interpolate(x, size=(hs, ws), mode="bilinear", align_corners=False) if (hs, ws) != (h, w) else x
    ph, pw = hs // grid, ws // grid
    patches = xr.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1).to(x.device)
    patches = patches[torch.arange(n, device=x.device).unsqueeze(1), perm]
    out = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, hs, ws)
    return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False) if (hs, ws) != (h, w) else out


@register
@dataclass
class DeYO(Method):
    """Entropy filter + PLPD filter (confidence drop of the predicted class under patch shuffling), both also used
    as sample weights (Lee et al. 2024)."""

    name: ClassVar[str] = "deyo"
    fusable: ClassVar[bool] = False          # shuffled-patch forward inside objective
    order: ClassVar[int] = 5
    e_margin: float | None = None            # filter, default 0.5 ln C
    e_margin0: float | None = None           # weighting, default 0.4 ln C
    plpd_threshold: float = 0.2
    grid: int = 4

    def __post_init__(self):
        if self.e_margin is None:
            self.e_margin = 0.5 * self.ln_c
        if self.e_margin0 is None:
            self.e_margin0 = 0.4 * self.ln_c

    def objective(self, ctx, theta, logits, features):
        ent = softmax_entropy(logits)
        sel = ent < resolved(self.e_margin)
        if not sel.any():
            return None, {}, 0
        x_sel = ctx.x[sel]
        with torch.no_grad():
            shuffled = patch_shuffle(x_sel, self.grid, ctx.generator)
            probs_prime = ctx.forward(theta.detach(), shuffled, False)[0].softmax(1)
        probs = logits[sel].softmax(1).detach()
        pred = probs.argmax(1, keepdim=True)
        plpd = (probs.gather(1, pred) - probs_prime.gather(1, pred)).squeeze(1)
        keep = plpd > self.plpd_threshold
        if not keep.any():
            return None, {}, 0
        ent_k = ent[sel][keep]
        coeff = torch.exp(-(ent_k.detach() - resolved(self.e_margin0))) + torch.exp(plpd[keep].detach())
        return (ent_k * coeff).mean(), {}, int(keep.sum())
