"""Why a batch was not applied, rolled back or reset: one enum each, in one place.

The members are ``StrEnum`` values, so ``str()``, f-strings, JSON and HTTP bodies show exactly the historical
strings (``"non_finite_loss"``, ...); compare with the members, never with string literals.
"""
from __future__ import annotations

from enum import Enum

__all__ = ["ResetReason", "RollbackReason", "SkipReason", "StrEnum"]


class StrEnum(str, Enum):
    """``enum.StrEnum`` of Python 3.11, written out for 3.10: ``str(member)`` and ``f"{member}"`` are the value."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class SkipReason(StrEnum):
    """``StepResult.skipped_reason``: no update was applied to the stream for this batch."""

    NON_FINITE_LOSS = "non_finite_loss"
    NON_FINITE_GRAD = "non_finite_grad"
    NON_FINITE_UPDATE = "non_finite_update"
    NO_RELIABLE_SAMPLES = "no_reliable_samples"
    ADAPTATION_DISABLED = "adaptation_disabled"
    GRADIENT_FREE_METHOD = "gradient_free_method"
    ACCUMULATING = "accumulating"              # fewer than update_images images since the last update
    GUARD_HOLD = "guard_hold"                  # the guard holds the stream at source (it judged the source better)


class RollbackReason(StrEnum):
    """``StepResult.rollback_reason``: the label-free collapse guard rolled the stream back."""

    CLASS_COLLAPSE = "class_collapse"                          # one class takes over the predictions (extreme)
    ENTROPY_DIVERGENCE = "entropy_divergence"                  # predictions spread out to near-uniform
    PARTIAL_COLLAPSE = "partial_collapse"                      # one class far more often than the source predicts it
    SOURCE_DISAGREEMENT = "source_disagreement"                # overturns the source's confident predictions
    LESS_CERTAIN_THAN_SOURCE = "less_certain_than_source"      # less certain than the source on the same images


class ResetReason(StrEnum):
    """``StepResult.reset_reason``: the method's own model recovery reset the stream to source (spelled
    ``<method>_recovery``; a method declares its member as ``Method.recovery_reason``)."""

    SAR_RECOVERY = "sar_recovery"
