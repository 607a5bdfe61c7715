"""Label-free safety guard: notices when adaptation hurts a stream and says where to fall back to.

Contract. Every signal is an exponential moving average over *images* (time constant ``horizon_images``), so the
guard judges a stream the same whatever its request sizes. Signals live in the stream state (``guard.*`` tensors):
exact reset, snapshot and restore like the rest of the state.

Signals on every image (the adapted model's own predictions):

* ``entropy``: mean prediction entropy / ln C; at or above ``max_entropy`` the model has diverged to uniform;
* ``class_share``: the share of each predicted class; one class at or above ``max_class_share`` is an extreme
  collapse, whatever the source says.

Signals against the source model, on a share ``check_share`` of the images (a deterministic per-stream credit:
N-image requests check ``check_share * N`` images on average, the first ones of a request), classified a second
time with the source parameters and statistics (one extra forward over those images, no gradient):

* ``excess_share``: for the class the adapted model predicts most, its share among the adapted predictions minus
  its share among the source predictions of the same images. Label shift moves both; a model that collapses
  onto a class moves only the first (partial collapse, e.g. one class taking 60% of the predictions while the
  source gives it 20%);
* ``agreement``: on the checked images the source is confident about (max probability >= ``source_confidence``),
  the share on which the adapted model predicts the same class. Adaptation fixes the source's uncertain images;
  it has no reason to overturn many confident ones, and slow drift shows up here first;
* ``entropy_gap``: the adapted model's mean entropy minus the source's on the same images; adaptation that
  leaves the model *less* certain than the source is not helping.

The source signals are only used while the source is a usable reference: its predictions on the checked images
are diverse (normalised entropy of their histogram >= ``min_source_diversity``; under strong corruption a
source model often predicts one class for everything, and then any disagreement with it is a gain), and, for
``agreement``, it is confident on at least ``min_source_confident`` of them.

A stream is judged only after ``warmup_images`` images (and ``warmup_checks`` checked images for the source
signals). Judgement returns a :class:`Fallback` reason or None. For the collapse reasons the engine restores the
last healthy anchor (taken every ``anchor_every_images`` healthy images) or, without one, the source; for the
reasons that say the source is better here (:data:`HOLD_REASONS`) it resets the stream to source and holds it
there (no adaptation) for ``hold_images`` images, doubled for every such fallback in a row (up to 8x; the count
is cleared by a healthy anchor), before adapting again; the hold ends early when the source stops being a usable
reference (:func:`source_failing`: the data changed under the stream, and the source is no longer better).

Holds end with the domain that caused them (``shift_threshold``; None: off). A hold is meant for the data that made
the source the better model; on a stream of short domains a hold of ``hold_images`` images (doubled on repeated
fallbacks) outlasts that domain and keeps the following ones at source, where adaptation would help. A label-free
domain-shift signal ends it early. Every image gets a small descriptor of its pixels (:func:`image_descriptor`:
mean, log contrast, log high-frequency energy, colour spread; what the corruptions of the benchmark change, and
independent of the model). The guard keeps a fast per-image EMA of it (time constant ``shift_images``), and, from
the start of each hold, a reference: the mean and per-image variance of the descriptor over the hold's first
``shift_reference_images`` images, then frozen. Once the reference is complete, a hold ends (and the backoff count
is cleared) when some feature of the fast EMA is more than ``shift_threshold`` reference standard deviations away
from the reference (:func:`shift_score`). The release is counted (:class:`~mgg_core.reasons.HoldRelease`,
``StepResult.hold_released``), as is the older early end when the source stops being a usable reference.

Confident holds (``confident_hold_entropy``; None: off). Under label shift (a camera seeing a few classes at a time)
a right, confident source predicts few classes too, and :func:`source_failing` would read it as collapsed and end the
hold after ``warmup_checks`` checked images: on a domain where the source is good the stream then cycles between
losing adaptation and short holds. With the setting the stream tracks the source's entropy EMA on its checked images
(``guard.source_entropy``), and a hold does not end as ``source_failing`` while that EMA is at most
``confident_hold_entropy`` (:func:`confident_hold`); it still ends by running out or on a domain shift. It starts
no hold of its own (unlike ``confident_entropy``'s check). When set it is the limit: it replaces
``confident_entropy``'s (which, with ``confident_keeps_hold``, keeps holds the same way), even when lower.

Statistics-only holds (``hold_statistics``; a model with per-stream normalisation statistics). On a BatchNorm model
most of the gain comes from the per-stream statistics, and the parameters are what drifts. With
``hold_statistics`` the first fallback of :data:`HOLD_REASONS` in a row resets the stream to source but keeps its
statistics adapting during the hold (the gradient-free ``bn`` path: parameters at source, no gradient). The guard
keeps judging such a hold (signal state ``hold_stats`` = 1): when it again finds a reason to fall back, the
statistics hurt as well (label shift erasing the class signal) and the stream escalates to a full source hold
(parameters and statistics), counted as a second fallback with the reason found. Later fallbacks in a row (the
backoff count > 1) hold at full source directly.

Collapse holds (``collapse_hold_images``; None: off). A fallback for a collapse reason (``class_collapse``,
``entropy_divergence``, ``partial_collapse``) restores the last healthy anchor and adapts on; without an anchor it goes
to source and, by default, adapts again at once. On a domain where adapting from the source collapses at once (the
held-out gaussian_blur-5@imagenet-c: the per-stream statistics alone take the predictions to a few classes within one
request), the reset also empties the guard's signals, so the next judgement needs a new warm-up (``warmup_images``,
``warmup_checks``) while the stream gets request after request wrong where the source was right, and each further
fallback restarts this. With the setting such a fallback to source holds there like a fallback of
:data:`HOLD_REASONS`: ``collapse_hold_images`` images, doubled for every fallback in a row (the backoff count, shared
with the other holds; cleared by a healthy anchor and by a domain-shift release), gradient-free and with the source's
statistics (never a statistics-only hold: the statistics are what collapsed), ending early as the other holds do.

Kept source history (``keep_source_history``; False: off). Whether the source is a usable reference (its prediction
diversity, ``min_source_diversity``) describes the data, not the adapted model, like the domain-shift descriptor
``shift_fast`` that a hold keeps. By default a fallback resets the source's prediction histogram with the model, and on
a stream where the source predicts few classes (a near-chance domain, a Dirichlet class slot) the new one, built from
a few requests, is often below ``min_source_diversity``: after the warm-up the guard judges nothing against the source
for many requests while adaptation restarts (held-out gaussian_blur-5@imagenet-c: 14 requests, below the 0.5 at
0.42-0.50 while it was 0.66-0.70 before). With the setting the stream keeps a second source histogram
(``guard.source_history``, updated exactly as ``source_hist``, so equal to it until the first fallback) that no
fallback resets (only a stream reset does); every source-diversity check (:func:`judge`, :func:`source_failing`,
:func:`confident_source`) reads it, while the comparisons of the adapted model with the source (excess share,
agreement, entropy gap) still use the fresh histograms and EMAs of the same images, after the usual warm-up.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .losses import softmax_entropy
from .reasons import HoldRelease, RollbackReason

__all__ = ["HOLD_REASONS", "Fallback", "GuardConfig", "HoldRelease", "SHIFT_FEATURES", "check_count",
           "confident_hold", "confident_source", "domain_shift", "fallback_hold", "guard_init_state", "hold_length",
           "hold_release", "image_descriptor", "judge", "observe", "observe_many", "shift_score", "source_diversity",
           "source_failing", "source_reference"]


#: why the guard fell back (``StepResult.rollback_reason``; a metric label value): the engine's RollbackReason
Fallback = RollbackReason


@dataclass
class GuardConfig:
    """Label-free guard; see the module docstring. Thresholds are on per-image EMAs."""

    enabled: bool = False
    horizon_images: int = 64         # 64/64/16: chosen on held-out streams (docs/results/smallbatch/heldout)
    warmup_images: int = 64
    warmup_checks: int = 16
    max_class_share: float = 0.8
    max_entropy: float = 0.95
    check_share: float = 0.25
    source_confidence: float = 0.9
    min_agreement: float = 0.97
    max_excess_share: float = 0.3
    max_entropy_gap: float = 0.1
    anchor_every_images: int = 512
    min_source_diversity: float = 0.5
    min_source_confident: float = 0.3
    hold_images: int = 128           # 128 (was 512): chosen on held-out streams with the depth-dependent statistics
    hold_statistics: bool = False
    shift_threshold: float | None = 6.0    # end a hold on a domain shift (reference std devs; held-out); None: off
    shift_images: int = 8                  # time constant (images) of the descriptor's fast EMA
    shift_reference_images: int = 32       # images at the start of a hold that make its reference
    confident_entropy: float | None = None  # the source is "confident" at or below this entropy EMA; None: off
    confident_entropy_gap: float = 0.05     # ... and adaptation hurts when it is this much less certain than it
    confident_checks: int = 8               # checked images before the confident-source check judges
    confident_agreement: float = 0.5        # ... and only while the adapted model mostly agrees with the source
    confident_keeps_hold: bool = True       # a confident source is never "failing" (source_failing) while held
    judge_images: int | None = None         # outside holds, judge once this many images arrived since the last
                                            # judgement (request-size independent decision rate); None: every request
    confident_hold_entropy: float | None = None  # a hold does not end as source_failing while the source's entropy
                                            # EMA is at most this (label shift, not a failing source); None: off
    collapse_hold_images: int | None = None  # a collapse fallback that goes to source (no anchor) also holds there,
                                            # this many images doubled per fallback in a row; None: adapt at once
    keep_source_history: bool = False       # the source-diversity checks read a source histogram that fallbacks
                                            # keep (guard.source_history); False: the one a fallback resets

    def __post_init__(self) -> None:
        if self.horizon_images < 1 or self.anchor_every_images < 1:
            raise ValueError("guard horizon_images and anchor_every_images must be >= 1")
        if self.shift_images < 1 or self.shift_reference_images < 1:
            raise ValueError("guard shift_images and shift_reference_images must be >= 1")
        if self.shift_threshold is not None and not self.shift_threshold > 0:
            raise ValueError(f"guard shift_threshold must be > 0 or None, got {self.shift_threshold}")
        if self.confident_entropy is not None and not 0.0 < self.confident_entropy <= 1.0:
            raise ValueError(f"guard confident_entropy must be in (0, 1] or None, got {self.confident_entropy}")
        if not 0.0 <= self.confident_entropy_gap <= 1.0 or not 0.0 <= self.confident_agreement <= 1.0:
            raise ValueError("guard confident_entropy_gap and confident_agreement must be in [0, 1]")
        if self.confident_checks < 1:
            raise ValueError(f"guard confident_checks must be >= 1, got {self.confident_checks}")
        if not 0.0 <= self.check_share <= 1.0:
            raise ValueError(f"guard check_share must be in [0, 1], got {self.check_share}")
        if self.confident_hold_entropy is not None and not 0.0 < self.confident_hold_entropy <= 1.0:
            raise ValueError("guard confident_hold_entropy must be in (0, 1] or None, "
                             f"got {self.confident_hold_entropy}")
        if self.judge_images is not None and not 1 <= self.judge_images <= 1_000_000:
            raise ValueError(f"guard judge_images must be in [1, 1000000] or None, got {self.judge_images}")
        if self.collapse_hold_images is not None and not 1 <= self.collapse_hold_images <= 1_000_000:
            raise ValueError("guard collapse_hold_images must be in [1, 1000000] or None, "
                             f"got {self.collapse_hold_images}")


def guard_init_state(num_classes: int, device, source_entropy: bool = True,
                     judge_count: bool = False, source_history: bool = False) -> dict[str, torch.Tensor]:
    """A new stream's guard signals (``guard.`` prefix in the stream state).

    Args:
        num_classes: the classifier's classes (the histograms' length).
        device: where the signals live (the engine's device).
        source_entropy: with the source's entropy EMA that :func:`confident_source` judges (engines leave it out
            when that check is off, so that their snapshots keep the older layout).
        judge_count: with the images seen since the guard's last judgement (``since_judge``), for
            ``GuardConfig.judge_images`` (left out when that is None: the older layout).
        source_history: with the source histogram that fallbacks keep (``source_history``), for
            ``GuardConfig.keep_source_history`` (left out when that is False: the older layout).
    """
    z = torch.zeros((), device=device)
    out = {"entropy_ema": torch.full((), float("nan"), device=device),
            "class_share": torch.zeros(num_classes, device=device),
            "credit": z.clone(), "checked": z.clone(), "confident": z.clone(), "hold": z.clone(), "backoff": z.clone(),
            "hold_stats": z.clone(),
            "confident_share": torch.full((), float("nan"), device=device),
            "adapted_hist": torch.zeros(num_classes, device=device),
            "source_hist": torch.zeros(num_classes, device=device),
            "agreement": torch.full((), float("nan"), device=device),
            "entropy_gap": torch.full((), float("nan"), device=device),
            "shift_fast": torch.full((SHIFT_FEATURES,), float("nan"), device=device),
            "shift_ref": torch.zeros(SHIFT_FEATURES, device=device),
            "shift_ref_sq": torch.zeros(SHIFT_FEATURES, device=device),
            "shift_ref_n": z.clone()}
    if source_entropy:
        out["source_entropy"] = torch.full((), float("nan"), device=device)
    if judge_count:
        out["since_judge"] = z.clone()
    if source_history:
        out["source_history"] = torch.zeros(num_classes, device=device)
    return out


#: features of :func:`image_descriptor`
SHIFT_FEATURES = 4
_SHIFT_VAR_FLOOR = 1e-4


def image_descriptor(x: torch.Tensor) -> torch.Tensor:
    """Per image (rows): mean intensity, log contrast (pixel std), log high-frequency energy (mean absolute
    difference of neighbouring pixels), colour spread (std of the channel means); ``x``: (N, C, H, W)."""
    x = x.detach().float()
    means = x.mean((2, 3))
    contrast = x.std((2, 3), unbiased=False).mean(1)
    hf = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3))
    return torch.stack([means.mean(1), (contrast + 1e-3).log(), (hf + 1e-3).log(), means.std(1, unbiased=False)], 1)


def _keep(cfg: GuardConfig, n: int | float) -> float:
    """EMA weight of the past after ``n`` images."""
    return (1.0 - 1.0 / cfg.horizon_images) ** float(n)


def check_count(cfg: GuardConfig, g: dict[str, torch.Tensor], n: int) -> tuple[int, torch.Tensor]:
    """How many of the next ``n`` images to check against the source, and the new credit."""
    credit = float(g["credit"]) + cfg.check_share * n
    k = min(n, int(math.floor(credit + 1e-9)))
    return k, torch.full_like(g["credit"], credit - k)


def shift_score(cfg: GuardConfig, g: dict[str, torch.Tensor]) -> float:
    """Largest distance, in reference standard deviations, of the fast descriptor EMA from the hold's reference
    (0 until the reference has ``shift_reference_images`` images)."""
    if float(g["shift_ref_n"]) < cfg.shift_reference_images or bool(torch.isnan(g["shift_fast"]).any()):
        return 0.0
    var = (g["shift_ref_sq"] - g["shift_ref"].pow(2)).clamp(min=0) + _SHIFT_VAR_FLOOR
    return float(((g["shift_fast"] - g["shift_ref"]).abs() / var.sqrt()).max())


def domain_shift(cfg: GuardConfig, g: dict[str, torch.Tensor]) -> bool:
    """While holding: the data moved away from the domain the hold was for (off when ``shift_threshold`` is None)."""
    return cfg.shift_threshold is not None and shift_score(cfg, g) > cfg.shift_threshold


def observe(cfg: GuardConfig, g: dict[str, torch.Tensor], logits: torch.Tensor,
            source_logits: torch.Tensor | None, images: torch.Tensor | None = None,
            holding: bool = False) -> dict[str, torch.Tensor]:
    """Updated guard signals after one request (``source_logits``: of the request's first checked images;
    ``images``: the request, for the domain-shift descriptor; ``holding``: the request was held at source):
    :func:`observe_many` of one stream."""
    return observe_many(cfg, [g], [logits], [source_logits], [images], [holding])[0]


def observe_many(cfg: GuardConfig, gs: Sequence[dict[str, torch.Tensor]], logits: Sequence[torch.Tensor],
                 source_logits: Sequence[torch.Tensor | None], images: Sequence[torch.Tensor | None],
                 holding: Sequence[bool]) -> list[dict[str, torch.Tensor]]:
    """Updated guard signals of many streams after one request each (``gs[i]``, ``logits[i]``, ... : stream i's
    arguments, as :func:`observe` takes them): the streams whose requests have equal shapes (images, checked images)
    share one set of tensor ops over their stacked signals, instead of a few dozen small ops each, with no host
    synchronisation. The one implementation of the update (:func:`observe` is this for one stream);
    tests/test_guard_many.py checks every stream's result against a per-stream reference, within float rounding."""
    groups: dict[tuple, list[int]] = {}
    for i, (g, lg, src, im) in enumerate(zip(gs, logits, source_logits, images, strict=True)):
        k = 0 if src is None else int(src.shape[0])
        shape = None if im is None or "shift_fast" not in g else tuple(im.shape)
        groups.setdefault((tuple(lg.shape), k, shape, "source_entropy" in g, "source_history" in g), []).append(i)
    out: list[dict[str, torch.Tensor]] = [{} for _ in gs]
    for (_, k, shape, _, _), idx in groups.items():
        rows = _observe_rows(cfg, [gs[i] for i in idx], torch.stack([logits[i] for i in idx]),
                             _stack_rows(source_logits, idx) if k else None,
                             None if shape is None else _stack_rows(images, idx), [bool(holding[i]) for i in idx])
        for r, i in enumerate(idx):
            out[i] = dict(gs[i])
            out[i].update({key: v[r] for key, v in rows.items()})
    return out


def _stack_rows(items: Sequence[torch.Tensor | None], idx: list[int]) -> torch.Tensor:
    rows = [t for t in (items[i] for i in idx) if t is not None]
    if len(rows) != len(idx):
        raise ValueError("observe_many: a group mixes given and missing tensors")
    return torch.stack(rows)


def _stacked(gs: Sequence[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([g[key] for g in gs])


def _ema_rows(old: torch.Tensor, new: torch.Tensor, keep: float) -> torch.Tensor:
    """EMA per row of ``old`` (S, ...): ``keep * old + (1 - keep) * new``; a row with a NaN (unset) takes ``new``."""
    new = new.to(old)
    fresh = torch.isnan(old).reshape(old.shape[0], -1).any(1).reshape((-1,) + (1,) * (old.dim() - 1))
    return torch.where(fresh, new, keep * old + (1.0 - keep) * new)


def _mix_hist_rows(old: torch.Tensor, hist: torch.Tensor, keep: float) -> torch.Tensor:
    """Histogram EMA per row of ``old`` (S, C); an empty row (sum 0: the histograms are non-negative) takes
    ``hist``."""
    hist = hist.to(old)
    return torch.where(old.sum(1, keepdim=True) == 0, hist, keep * old + (1.0 - keep) * hist)


def _hist_rows(pred: torch.Tensor, c: int) -> torch.Tensor:
    """Per row of ``pred`` (S, n) class indices: the class histogram (S, c) as shares, by one ``bincount``."""
    rows, n = pred.shape
    offsets = torch.arange(rows, device=pred.device).unsqueeze(1) * c
    return torch.bincount((pred + offsets).reshape(-1), minlength=rows * c).reshape(rows, c).float() / n


def _observe_rows(cfg: GuardConfig, gs: Sequence[dict[str, torch.Tensor]], logits: torch.Tensor,
                  source_logits: torch.Tensor | None, images: torch.Tensor | None,
                  holding: list[bool]) -> dict[str, torch.Tensor]:
    """:func:`observe` for S streams of equal request shapes (``logits`` (S, n, C), ``source_logits`` (S, k, C),
    ``images`` (S, n, ...)): the updated signals, stacked (S, ...)."""
    rows, n, c = logits.shape
    ln_c = math.log(c)
    keep = _keep(cfg, n)
    ent = (softmax_entropy(logits.reshape(rows * n, c).float()) / ln_c).clamp(0, 1).reshape(rows, n)
    new = {"entropy_ema": _ema_rows(_stacked(gs, "entropy_ema"), ent.mean(1), keep),
           "class_share": _mix_hist_rows(_stacked(gs, "class_share"), _hist_rows(logits.argmax(2), c), keep)}
    if images is not None:
        _observe_shift_rows(cfg, gs, new, images, holding)
    if source_logits is None or source_logits.shape[1] == 0:
        return new
    k = source_logits.shape[1]
    a, s = logits[:, :k].float(), source_logits.float()
    a_pred, s_prob = a.argmax(2), s.softmax(2)
    s_pred = s_prob.argmax(2)
    new["adapted_hist"] = _mix_hist_rows(_stacked(gs, "adapted_hist"), _hist_rows(a_pred, c), keep)
    s_hist = _hist_rows(s_pred, c)
    new["source_hist"] = _mix_hist_rows(_stacked(gs, "source_hist"), s_hist, keep)
    if "source_history" in gs[0]:            # the groups of observe_many: all or none of its streams have it
        new["source_history"] = _mix_hist_rows(_stacked(gs, "source_history"), s_hist, keep)
    s_ent = softmax_entropy(s.reshape(rows * k, c)).reshape(rows, k).mean(1) / ln_c
    a_ent = softmax_entropy(a.reshape(rows * k, c)).reshape(rows, k).mean(1) / ln_c
    new["entropy_gap"] = _ema_rows(_stacked(gs, "entropy_gap"), a_ent - s_ent, keep)
    if "source_entropy" in gs[0]:            # the groups of observe_many: all or none of its streams have it
        new["source_entropy"] = _ema_rows(_stacked(gs, "source_entropy"), s_ent, keep)
    conf = s_prob.max(2).values >= cfg.source_confidence
    new["confident_share"] = _ema_rows(_stacked(gs, "confident_share"), conf.float().mean(1), keep)
    n_conf = conf.sum(1)
    agree = ((a_pred == s_pred) & conf).sum(1).float() / n_conf.clamp(min=1).float()
    old_agreement = _stacked(gs, "agreement")
    new["agreement"] = torch.where(n_conf > 0, _ema_rows(old_agreement, agree, keep), old_agreement)
    new["confident"] = _stacked(gs, "confident") + n_conf
    new["checked"] = _stacked(gs, "checked") + k
    return new


def _observe_shift_rows(cfg: GuardConfig, gs: Sequence[dict[str, torch.Tensor]], new: dict[str, torch.Tensor],
                        images: torch.Tensor, holding: list[bool]) -> None:
    """The domain-shift descriptor's signals for S streams' requests of equal shape (``images`` (S, n, ...)): its
    fast EMA; while holding, the hold's reference (a running mean) until it has ``shift_reference_images``."""
    rows, n = images.shape[:2]
    fast = _stacked(gs, "shift_fast")
    per_image = image_descriptor(images.reshape(rows * n, *images.shape[2:])).to(fast).reshape(rows, n, -1)
    d = per_image.mean(1)
    new["shift_fast"] = _ema_rows(fast, d, (1.0 - 1.0 / cfg.shift_images) ** n)
    if not any(holding):
        return
    seen = _stacked(gs, "shift_ref_n")
    grow = torch.tensor(holding, device=seen.device) & (seen < cfg.shift_reference_images)
    w64 = n / (seen.double() + n)            # the running mean's weight, as observe rounds it (float64)
    w, w_old = w64.to(fast).unsqueeze(1), (1.0 - w64).to(fast).unsqueeze(1)
    ref, ref_sq = _stacked(gs, "shift_ref"), _stacked(gs, "shift_ref_sq")
    d_sq = per_image.pow(2).mean(1)
    new["shift_ref"] = torch.where(grow.unsqueeze(1), w_old * ref + w * d, ref)
    new["shift_ref_sq"] = torch.where(grow.unsqueeze(1), w_old * ref_sq + w * d_sq, ref_sq)
    new["shift_ref_n"] = torch.where(grow, seen + n, seen)


def source_reference(g: dict[str, torch.Tensor]) -> torch.Tensor:
    """The source histogram whose diversity says whether the source is a usable reference: ``source_history`` (kept
    across fallbacks; ``keep_source_history``) when the stream has it, else ``source_hist``."""
    return g["source_history"] if "source_history" in g else g["source_hist"]


def source_diversity(hist: torch.Tensor) -> float:
    """Normalised entropy (0: one class, 1: uniform) of a prediction histogram."""
    total = float(hist.sum())
    if total <= 0:
        return 0.0
    p = hist / total
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(hist.numel()))


#: fallbacks that say "the source model is better here": the stream holds at source for hold_images images
HOLD_REASONS = frozenset({Fallback.SOURCE_DISAGREEMENT, Fallback.LESS_CERTAIN_THAN_SOURCE,
                          Fallback.CONFIDENT_SOURCE})


def hold_length(cfg: GuardConfig, g: dict[str, torch.Tensor], base: int | None = None) -> float:
    """Images to hold at source after a fallback (``g``: signals after the reset): ``base`` (``hold_images`` when
    None, the length after a fallback of :data:`HOLD_REASONS`) doubled for every fallback in a row (up to 8x)."""
    first = cfg.hold_images if base is None else base
    return float(first) * 2.0 ** min(max(float(g["backoff"]) - 1.0, 0.0), 3.0)


def fallback_hold(cfg: GuardConfig, reason: Fallback, anchored: bool) -> int | None:
    """The first hold's length (before the backoff doubling of :func:`hold_length`) of a fallback for ``reason``,
    or None when the fallback restores a state and adapts on at once (``anchored``: the stream has a healthy
    anchor). :data:`HOLD_REASONS` hold ``hold_images``; the collapse reasons go to the anchor, or without one to
    source, and hold there ``collapse_hold_images`` when that is set (collapse holds, module docstring)."""
    if reason in HOLD_REASONS:
        return cfg.hold_images
    if cfg.collapse_hold_images is not None and not anchored:
        return cfg.collapse_hold_images
    return None


def source_failing(cfg: GuardConfig, g: dict[str, torch.Tensor]) -> bool:
    """While holding at source: the source now predicts (nearly) one class, so it is no longer the better model.
    Not while the source is confident (:func:`confident_hold`): a confident source predicting few classes is what
    label shift looks like; a new domain ends the hold (``shift_threshold``)."""
    if float(g["checked"]) < cfg.warmup_checks or source_diversity(source_reference(g)) >= cfg.min_source_diversity:
        return False
    return not confident_hold(cfg, g)


def confident_hold(cfg: GuardConfig, g: dict[str, torch.Tensor]) -> bool:
    """The source's entropy EMA on the checked images is at most ``confident_hold_entropy`` (or, without it, at most
    ``confident_entropy`` with ``confident_keeps_hold``): a hold at such a source does not end as ``source_failing``.
    False when neither is set or the EMA is unset."""
    limit = cfg.confident_hold_entropy
    if limit is None and cfg.confident_entropy is not None and cfg.confident_keeps_hold:
        limit = cfg.confident_entropy
    se = float(g["source_entropy"]) if "source_entropy" in g else float("nan")
    return limit is not None and not math.isnan(se) and se <= limit


def hold_release(cfg: GuardConfig, g: dict[str, torch.Tensor]) -> HoldRelease | None:
    """While holding at source: why the hold ends early (the source failing first), or None to keep holding."""
    if source_failing(cfg, g):
        return HoldRelease.SOURCE_FAILING
    if domain_shift(cfg, g):
        return HoldRelease.DOMAIN_SHIFT
    return None


def confident_source(cfg: GuardConfig, g: dict[str, torch.Tensor]) -> bool:
    """The source is already good here and adaptation only makes the model less certain (off when
    ``confident_entropy`` is None): at least ``confident_checks`` checked images, the source's entropy EMA at most
    ``confident_entropy``, the adapted model's at least ``confident_entropy_gap`` above it, the adapted model
    agreeing with the source's confident predictions at least ``confident_agreement`` of the time (a source that
    confidently predicts one class for a corruption is overturned by a helpful adaptation: no hold then), and the
    source's predictions diverse (``min_source_diversity``, as for the other source checks: on several test
    corruptions the source predicts one class for every image, confidently)."""
    if cfg.confident_entropy is None or "source_entropy" not in g or float(g["checked"]) < cfg.confident_checks:
        return False
    if source_diversity(source_reference(g)) < cfg.min_source_diversity:
        return False     # a source predicting (nearly) one class, however confident, is no reference (judge())
    se, gap, agree = float(g["source_entropy"]), float(g["entropy_gap"]), float(g["agreement"])
    if math.isnan(se) or math.isnan(gap) or math.isnan(agree):
        return False
    return se <= cfg.confident_entropy and gap > cfg.confident_entropy_gap and agree >= cfg.confident_agreement


def judge(cfg: GuardConfig, g: dict[str, torch.Tensor], images: int) -> Fallback | None:
    """The reason to fall back, or None while the stream looks healthy."""
    if confident_source(cfg, g):         # judged from the first checks on: no warm-up for a source this good
        return Fallback.CONFIDENT_SOURCE
    if images < cfg.warmup_images:
        return None
    share = g["class_share"]
    if float(share.sum()) > 0 and float(share.max() / share.sum()) >= cfg.max_class_share:
        ah, sh = g["adapted_hist"], g["source_hist"]
        top = int(share.argmax())
        # extreme collapse, unless the source predicts that class as often (label shift, not collapse)
        if float(sh.sum()) == 0 or float(ah[top] - sh[top]) > cfg.max_excess_share / 2:
            return Fallback.CLASS_COLLAPSE
    if not bool(torch.isnan(g["entropy_ema"])) and float(g["entropy_ema"]) >= cfg.max_entropy:
        return Fallback.ENTROPY_DIVERGENCE
    if float(g["checked"]) < cfg.warmup_checks:
        return None
    ah, sh = g["adapted_hist"], g["source_hist"]
    if source_diversity(source_reference(g)) < cfg.min_source_diversity:
        return None      # the source itself predicts (nearly) one class: it is no reference to judge against
    top = int(ah.argmax())
    if float(ah[top] - sh[top]) > cfg.max_excess_share:
        return Fallback.PARTIAL_COLLAPSE
    if (float(g["confident"]) >= cfg.warmup_checks / 2 and not bool(torch.isnan(g["agreement"]))
            and float(g["confident_share"]) >= cfg.min_source_confident
            and float(g["agreement"]) < cfg.min_agreement):
        return Fallback.SOURCE_DISAGREEMENT
    if not bool(torch.isnan(g["entropy_gap"])) and float(g["entropy_gap"]) > cfg.max_entropy_gap:
        return Fallback.LESS_CERTAIN_THAN_SOURCE
    return None
