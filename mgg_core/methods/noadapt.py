"""No adaptation: the source model with its running BatchNorm statistics (the baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..reasons import SkipReason
from .base import Method, register

__all__ = ["NoAdapt"]


@register
@dataclass
class NoAdapt(Method):
    name: ClassVar[str] = "noadapt"
    order: ClassVar[int] = 0
    reference_lr: ClassVar[float | None] = None
    needs_grad: ClassVar[bool] = False
    bn_stats: ClassVar[str] = "source"
    default_optimizer: ClassVar[str | None] = None
    no_update_reason: ClassVar[SkipReason | None] = SkipReason.ADAPTATION_DISABLED
