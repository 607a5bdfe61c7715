"""Unsupervised test-time losses."""
from __future__ import annotations

import torch


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
