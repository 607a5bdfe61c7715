"""BN adapt: test-batch BatchNorm statistics, no gradient step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..reasons import SkipReason
from .base import Method, register

__all__ = ["BNAdapt"]


@register
@dataclass
class BNAdapt(Method):
    """Test-batch BatchNorm statistics, no gradient step (Schneider et al. 2020)."""

    name: ClassVar[str] = "bn"
    order: ClassVar[int] = 1
    requires_batchnorm: ClassVar[bool] = True
    reference_lr: ClassVar[float | None] = None
    needs_grad: ClassVar[bool] = False
    default_optimizer: ClassVar[str | None] = None
    no_update_reason: ClassVar[SkipReason | None] = SkipReason.GRADIENT_FREE_METHOD
