"""Why a batch was not applied, rolled back or reset: one enum each, in one place; and the reset policy of a stream.

The members are ``StrEnum`` values, so ``str()``, f-strings, JSON and HTTP bodies show exactly the historical
strings (``"non_finite_loss"``, ...); compare with the members, never with string literals.

:class:`ResetPolicy` is the one spelling of "when a stream goes back to the source model" (``per_domain`` or
``never``); :meth:`ResetPolicy.parse` normalises the accepted spellings at a boundary (``"domain"`` is the
benchmark's historical spelling of ``per_domain``), and :attr:`ResetPolicy.results_name` is what a benchmark's
results JSON records as ``reset_policy`` (unchanged, so committed results stay byte-identical).
"""
from __future__ import annotations

from enum import Enum

__all__ = ["HoldRelease", "ResetPolicy", "ResetReason", "RollbackReason", "SkipReason", "StrEnum"]


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
    CONFIDENT_SOURCE = "confident_source"                      # the source is confident here, adaptation less so


class HoldRelease(StrEnum):
    """``StepResult.hold_released``: why the guard ended a hold at source before its images ran out."""

    DOMAIN_SHIFT = "domain_shift"              # the data moved away from the domain the hold was for
    SOURCE_FAILING = "source_failing"          # the source predicts (nearly) one class: no longer the better model


class ResetReason(StrEnum):
    """``StepResult.reset_reason``: the method's own model recovery reset the stream to source (spelled
    ``<method>_recovery``; a method declares its member as ``Method.recovery_reason``)."""

    SAR_RECOVERY = "sar_recovery"


class ResetPolicy(StrEnum):
    """When a stream's adapted state goes back to the source model (a stream spec may also reset every N batches)."""

    PER_DOMAIN = "per_domain"  # at every domain (corruption) boundary of a sequential stream
    NEVER = "never"  # continual adaptation

    @classmethod
    def parse(cls, value: str) -> ResetPolicy:
        """The policy for an accepted spelling: a member's value or ``"domain"`` (the benchmark's old spelling)."""
        policy = _RESET_SPELLINGS.get(str(value))
        if policy is None:
            raise ValueError(f"reset policy must be one of {sorted(_RESET_SPELLINGS)}, not {value!r}")
        return policy

    @property
    def results_name(self) -> str:
        """The spelling a benchmark's results JSON records as ``reset_policy`` (``"domain"`` or ``"never"``)."""
        return "domain" if self is ResetPolicy.PER_DOMAIN else self.value


_RESET_SPELLINGS: dict[str, ResetPolicy] = {"per_domain": ResetPolicy.PER_DOMAIN, "domain": ResetPolicy.PER_DOMAIN,
                                            "never": ResetPolicy.NEVER}
