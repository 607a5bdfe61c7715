"""Unsupervised test-time losses (per-sample unless stated). Pure functions of tensors, differentiable."""
from __future__ import annotations

import math

import torch

__all__ = ["entropy_of_opinion", "feature_discrepancy", "smoothed_prior", "soft_likelihood_ratio", "softmax_entropy",
           "symmetric_cross_entropy"]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of softmax(logits)."""
    log_p = logits.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def feature_discrepancy(features: torch.Tensor, source_mean: torch.Tensor, source_std: torch.Tensor,
                        divisor: float = 64.0) -> torch.Tensor:
    """FOA's statistics discrepancy: (sum_d (std_B,d - std_S,d)^2 + sum_d (mean_B,d - mean_S,d)^2) / divisor.

    The batch std uses Bessel's correction as the reference does; with a single sample there is no batch std, so
    only the mean term is used.
    """
    mean = features.mean(dim=0)
    loss = (mean - source_mean).pow(2).sum()
    if features.shape[0] > 1:
        std = features.std(dim=0)
        loss = loss + (std - source_std).pow(2).sum()
    return loss / divisor


def entropy_of_opinion(logits: torch.Tensor, prior_mass: float | None = None) -> torch.Tensor:
    """COME's per-sample entropy of opinion (Zhang et al., ICLR 2025), in nats.

    Subjective-logic opinion of a Dirichlet with evidence e_k = exp(z_k) and prior mass K (the reference uses
    K = C, the class count): belief b_k = e_k / (sum_j e_j + K), uncertainty u = K / (sum_j e_j + K); the loss is the
    Shannon entropy of the (C+1)-vector [b, u]. That vector is softmax([z, ln K]), computed so here (no overflow).
    The conservative bound: the logits enter as z / ||z|| * stop_grad(||z||), so a step can turn the logit vector but
    cannot lengthen it (minimising entropy by inflating the logit norm, i.e. overconfidence, is blocked).
    The reference adds 1e-7 to every probability before the log; this exact form differs from it by < 1e-5.
    """
    k = float(logits.shape[1] if prior_mass is None else prior_mass)
    norm = logits.norm(p=2, dim=1, keepdim=True).clamp_min(1e-12)
    z = logits / norm * norm.detach()
    aug = torch.cat([z, torch.full_like(z[:, :1], math.log(k))], dim=1)
    log_p = aug.log_softmax(dim=1)
    return -(log_p.exp() * log_p).sum(dim=1)


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """ROID's per-sample soft likelihood ratio loss (Marsden et al., WACV 2024):
    -sum_k p_k log(p_k / (1 - p_k) + eps) with p = softmax(z) clipped to <= ``clip`` (no vanishing gradient for
    confident samples, unlike entropy)."""
    p = logits.softmax(dim=1).clamp(max=clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(dim=1)


def symmetric_cross_entropy(x: torch.Tensor, x_ref: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample symmetric cross-entropy of two logit tensors:
    -(1-alpha) sum softmax(x_ref) log_softmax(x) - alpha sum softmax(x) log_softmax(x_ref)."""
    a = -(x_ref.softmax(dim=1) * x.log_softmax(dim=1)).sum(dim=1)
    b = -(x.softmax(dim=1) * x_ref.log_softmax(dim=1)).sum(dim=1)
    return (1 - alpha) * a + alpha * b


def smoothed_prior(probs: torch.Tensor) -> torch.Tensor:
    """ROID's prior correction weights from a batch of probabilities (N, C): pi = mean_n p_n,
    s = max(1/N, 1/C) / max_k pi_k, prior = (pi + s) / (1 + s C) (a distribution, pulled towards uniform)."""
    n, c = probs.shape
    prior = probs.mean(dim=0)
    smooth = max(1.0 / n, 1.0 / c) / prior.max()
    return (prior + smooth) / (1 + smooth * c)
