"""Per-stream BatchNorm statistics: the statistics a BatchNorm layer normalises with, per stream and per request.

Contract. :class:`StreamNormStats` hooks every BatchNorm layer (any ``torch.nn.modules.batchnorm._BatchNorm``,
so timm's ``BatchNormAct2d`` too) of the engine's private, frozen model copy. Outside :meth:`StreamNormStats.use`
the layers behave as the mode says with no stream involved (``"source"``/``"ema"``: the source running
statistics; ``"batch"``: the statistics of the batch). Inside ``use(stats, n_images)`` each layer normalises with:

* ``"source"``: the source running statistics (the hooks do nothing);
* ``"batch"``: the statistics of the current batch (Schneider et al. 2020; TENT's setting), except where a
  layer sees a single value per channel (one image at 1x1 spatial size), where no batch variance exists: that
  layer falls back to the source statistics (no per-stream state);
* ``"ema"``: robust per-stream statistics (RoTTA's RBN, Yuan et al. 2023, with the BN-alpha family's mixing of
  source and test statistics): the stream's statistics, initialised to the source running statistics, are mixed
  with the batch's with a momentum that depends on the number of images, ``m_N = 1 - (1 - m)^N``, so N requests
  of one image move the statistics as much as one request of N images. The per-image momentum ``m`` may depend
  on depth (TTN, Lim et al. 2023: shallow layers' statistics reflect the corruption, deep layers' the class mix):
  ``shallow_momentum`` for the first BatchNorm layer, ``momentum`` for the last, geometric interpolation over
  the layers' order in between (:func:`layer_momenta`); without ``shallow_momentum`` every layer uses ``momentum``.
  Optional statistics warm-up (``prior_images`` N0; Schneider et al. 2020's prior strength, as a count): the
  stream counts the images merged since its statistics were the source's (``norm.seen``, t), and image t is merged
  with momentum ``max(m, 1 / (N0 + t + 1))``: a cumulative mean of the source (weighted as N0 images) and the
  stream's images until that falls below the layer's own momentum, then the usual EMA. A request of n images at
  count t merges in closed form (:func:`warm_momentum`): ``1 - M = (N0 + t) / (N0 + t + w) * (1 - m)^(n - w)``,
  w the request's images still in the warm-up, so N one-image requests move the statistics as one N-image request.
  Slow (deep) layers after a reset or a guard fallback then follow the first images like a large request would.
  Means and variances are merged as two populations (the variance of the mixture, including the spread of the
  means). The gradient flows through the batch part, so entropy minimisation still shapes the statistics as with
  batch statistics.

Optional class-balanced statistics (``balanced`` = lambda in (0, 1]; TRIBE's Balanced BatchNorm, Su et al. 2024, and
NOTE's prediction-balanced statistics, Gong et al. 2022): in ``"ema"`` each layer also keeps per-class statistics
``norm.<layer>.cmean`` / ``.cvar`` (K classes x C channels, initialised to the source's), and a request that moves
the statistics passes its images' pseudo-labels (``use(..., labels=...)``; the engine takes them from a no-grad
pre-pass with the stream's statistics as they are). Class k's statistics merge the batch statistics of the
request's images labelled k, per image as above: momentum ``1 - (1 - m)^n_k`` for n_k such images (with the
warm-up: per class, count ``norm.cseen``), so classes absent from a request do not move. The layer normalises with
the class-uniform mixture of the K class statistics (its mean, and its variance including the spread of the class
means; classes never seen are the source's), merged with the global ``"ema"`` statistics above as two populations
with weight lambda on the balanced part (1: balanced alone). The gradient flows through the request's class
batch statistics (and through the global ones when lambda < 1). N one-image requests move the class statistics as
one N-image request *given the same pseudo-labels*; the pre-pass labels of a stream cut into smaller requests come
from statistics updated more often, so they may differ. A request label-shifted to a few classes then moves only
those classes' statistics, not the normalisation of all of them.

Optional confidence gate (``confidence`` = tau in (0, 1); for the pseudo-labels' errors on low-accuracy domains):
:meth:`StreamNormStats.pseudo_labels` labels an image whose pre-pass max softmax probability is below tau with -1
(no class), whose one-hot row is zero: it moves the global statistics (and the warm-up count ``norm.seen``) as
always, but no class statistics and no per-class count. With ``"correction"`` the recent class mix then counts the
same (confident) images: it moves at the layer's momentum toward the request's *confident* class fractions
(summing to its confident share), so its sum is the stream's recent confident share at that layer, rho; the
correction uses the mix normalised to sum 1 and weight lambda x rho, so a stream whose recent images are mostly
unconfident keeps (about) its global statistics. Without it (None) every image is labelled, as before.

Optional agreement gate (``agree``; for wrong pseudo-labels that are confident, session 8's diagnostic): an image
whose pre-pass label differs from the frozen source model's label (the caller passes the source's logits of the same
images to :meth:`StreamNormStats.pseudo_labels`) is labelled -1 as above; with ``confidence`` too, a label must
agree *and* be confident. Optional share fade (``share`` = s0 in (0, 0.5], ``"correction"`` with a gate): the
correction's weight is lambda x clamp(rho / s0 - 1, 0, 1) instead of lambda x rho, rho the layer's recent gated
share: no correction while at most s0 of the recent images pass the gate (low-accuracy domains, where few
labels agree with the source, or a collapsed source that most labels disagree with), the full lambda from 2 s0 on.
Neither adds state: a gated label is -1 like an unconfident one.

Statistics live in the stream state (``StreamState.tensors``) under ``norm.<layer>.mean`` / ``.var``; ``use``
yields a dict that receives the updated statistics of the *first* forward pass within the block (later passes of
the same step, e.g. SAR's second pass or DeYO's shuffled images, read but do not update them). A step's statistics
are committed by the engine: a step rejected for non-finite values leaves them untouched, a request whose images
the method's filter rejected all still moves them (``engine.STATISTICS_DESPITE_SKIP``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BALANCED_FORMS", "BN_MODES", "CORRECTION_VAR_FLOOR", "MIX_SHARE_FLOOR", "BalancedForm", "StreamNormStats",
           "balanced_moments", "batch_moments", "batch_momentum", "class_moments", "class_momentum", "correction_form",
           "layer_momenta", "mix_moments", "mixture_form", "share_weight", "warm_momentum"]

#: how BatchNorm layers normalise, see the module docstring
BN_MODES = ("source", "batch", "ema")


def batch_momentum(momentum: float, n_images: int) -> float:
    """Momentum of one request of ``n_images`` images for a per-image momentum: ``1 - (1 - momentum)^n``."""
    return 1.0 - (1.0 - float(momentum)) ** int(n_images)


def warm_momentum(momentum: float, n_images: int, seen: float | torch.Tensor,
                  prior_images: float) -> float | torch.Tensor:
    """Momentum of one request of ``n_images`` images merged after ``seen`` images (float, or a tensor: one count
    per stream) with the warm-up of strength ``prior_images`` (N0): image j (0-based, counted since the source) has
    momentum ``max(momentum, 1 / (N0 + j + 1))``; their product in closed form (module docstring)."""
    m, n0 = float(momentum), float(prior_images)
    # image j is in the warm-up while 1 / (N0 + j + 1) > m, i.e. j < 1/m - N0 - 1 (at equality both give m)
    warm_end = max(0, math.ceil(1.0 / m - n0 - 1.0))
    if isinstance(seen, torch.Tensor):
        t = seen.to(torch.float64)
        w = (warm_end - t).clamp(0, int(n_images))
        return 1.0 - (n0 + t) / (n0 + t + w) * (1.0 - m) ** (int(n_images) - w)
    t_f = float(seen)
    w_f = min(max(warm_end - t_f, 0.0), float(n_images))
    return 1.0 - (n0 + t_f) / (n0 + t_f + w_f) * (1.0 - m) ** (int(n_images) - w_f)


def class_momentum(momentum: float, counts: torch.Tensor, seen: torch.Tensor | None,
                   prior_images: float | None) -> torch.Tensor:
    """Per-class momenta (float64, the shape of ``counts``) of a request holding ``counts`` images of each class:
    ``1 - (1 - m)^n_k``, or with the warm-up (``prior_images`` N0, per-class counts ``seen`` since the source) the
    closed form of :func:`warm_momentum` per class; 0 where a class has no image."""
    m, n = float(momentum), counts.to(torch.float64)
    if prior_images is None or seen is None:
        return 1.0 - (1.0 - m) ** n
    n0 = float(prior_images)
    warm_end = max(0, math.ceil(1.0 / m - n0 - 1.0))
    t = seen.to(torch.float64)
    w = torch.minimum((warm_end - t).clamp(min=0), n)
    return 1.0 - (n0 + t) / (n0 + t + w) * (1.0 - m) ** (n - w)


def class_moments(xs: torch.Tensor, onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class mean and (biased) variance of ``xs`` (S, n, C, R) over the images of each class and the R positions,
    classes given by ``onehot`` (S, n, K): (S, K, C) each, two passes; 0 for a class with no image."""
    inv = 1.0 / (onehot.sum(1) * xs.shape[3]).clamp(min=1)                      # (S, K)
    mean = torch.einsum("snk,snc->skc", onehot, xs.sum(3)) * inv[..., None]
    own = torch.einsum("snk,skc->snc", onehot, mean)                            # each image's class mean
    dev = (xs - own[..., None]).square().sum(3)
    return mean, torch.einsum("snk,snc->skc", onehot, dev) * inv[..., None]


def balanced_moments(cmean: torch.Tensor, cvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the class-uniform mixture of per-class statistics (..., K, C): (..., C) each (the
    variance includes the spread of the class means)."""
    mean = cmean.mean(-2)
    return mean, cvar.mean(-2) + (cmean - mean.unsqueeze(-2)).square().mean(-2)


def mixture_form(gmean: torch.Tensor, gvar: torch.Tensor, cmean: torch.Tensor, cvar: torch.Tensor,
                 mix: torch.Tensor | None, lam: float, gated: bool = False,
                 share: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``"mixture"`` (TRIBE's Balanced BatchNorm): the class-uniform mixture of the class statistics (..., K, C),
    merged with the stream's global statistics (..., C) at weight ``lam`` as two populations; ``mix``, ``gated`` and
    ``share`` unused."""
    b_mean, b_var = balanced_moments(cmean, cvar)
    return mix_moments(gmean, gvar, b_mean, b_var, lam)


#: ``"correction"``: the corrected variance is at least this share of the stream's global variance
CORRECTION_VAR_FLOOR = 0.1
#: ``"correction"`` with the confidence gate: a recent mix summing to less is normalised as if it summed to this
MIX_SHARE_FLOOR = 1e-12


def share_weight(rho: torch.Tensor, share: float | None) -> torch.Tensor:
    """The gated correction's weight per unit lambda for a recent gated share ``rho``: ``rho`` itself without a
    share fade (``share`` None), else ``clamp(rho / share - 1, 0, 1)`` (0 up to ``share``, 1 from twice it)."""
    if share is None:
        return rho
    return (rho / float(share) - 1.0).clamp(0.0, 1.0)


def correction_form(gmean: torch.Tensor, gvar: torch.Tensor, cmean: torch.Tensor, cvar: torch.Tensor,
                    mix: torch.Tensor | None, lam: float, gated: bool = False,
                    share: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``"correction"``: the stream's global statistics with their class mix replaced by the uniform one. The global
    EMA is (about) the mixture of the class statistics weighted by the stream's recent class mix ``mix`` (..., K),
    tracked at the same momenta; the result adds ``lam`` x (class-uniform mixture - ``mix``-weighted mixture) of the
    class statistics to it (mean and variance), the variance floored at ``CORRECTION_VAR_FLOOR`` x the global one.
    With a uniform recent mix (i.i.d. streams) it is the global statistics; only the class offsets enter, so class
    statistics that lag a domain switch shift it less than they shift ``"mixture"``.

    ``gated`` (the confidence or agreement gate, module docstring): ``mix`` counts only gated images and sums to the
    recent gated share rho; it is normalised to sum 1 and the weight is ``lam`` x rho (rho 0: the global statistics),
    or with ``share`` (the share fade) ``lam`` x :func:`share_weight`."""
    assert mix is not None
    b_mean, b_var = balanced_moments(cmean, cvar)
    if gated:
        rho = mix.sum(-1, keepdim=True)
        mix = mix / rho.clamp(min=MIX_SHARE_FLOOR)
        lam = lam * share_weight(rho, share).to(cmean.dtype)  # type: ignore[assignment]  # (..., 1): broadcasts
    w = mix.to(cmean.dtype).unsqueeze(-1)
    p_mean = (w * cmean).sum(-2)
    p_var = (w * (cvar + (cmean - p_mean.unsqueeze(-2)).square())).sum(-2)
    mean = gmean + lam * (b_mean - p_mean)
    var = torch.maximum(gvar + lam * (b_var - p_var), CORRECTION_VAR_FLOOR * gvar)
    return mean, var


@dataclass(frozen=True)
class BalancedForm:
    """How a layer uses its class statistics: ``fn(gmean, gvar, cmean, cvar, mix, lam, gated, share) -> (mean,
    var)``;
    ``tracks_mix``: the stream keeps its recent class mix per layer (``norm.<layer>.cmix``)."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    tracks_mix: bool = False


#: the forms of class-balanced statistics (``EngineConfig.bn_balanced_form``)
BALANCED_FORMS: dict[str, BalancedForm] = {"mixture": BalancedForm(mixture_form),
                                           "correction": BalancedForm(correction_form, tracks_mix=True)}


def layer_momenta(n_layers: int, momentum: float, shallow_momentum: float | None = None) -> list[float]:
    """Per-image momentum of each of ``n_layers`` BatchNorm layers in order: ``shallow_momentum`` for the first,
    ``momentum`` for the last, geometric in between (``shallow^(1-t) * momentum^t``, t = i / (n - 1)); every
    layer ``momentum`` when ``shallow_momentum`` is None or there is one layer."""
    for name, v in (("bn_momentum", momentum), ("bn_momentum_shallow", shallow_momentum)):
        if v is not None and not 0.0 < float(v) <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {v}")
    if shallow_momentum is None or n_layers < 2:
        return [float(momentum)] * n_layers
    lo, hi = math.log(float(shallow_momentum)), math.log(float(momentum))
    return [math.exp(lo + (hi - lo) * i / (n_layers - 1)) for i in range(n_layers)]


def batch_moments(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of ``x`` over ``dims``, in two passes (mean, then mean squared deviation):
    5-10x faster than ``torch.var_mean`` over these dimensions on the CPU (scripts/bench_fused.py), as exact
    (1e-7 relative). Both keep the dimensions not reduced, in order."""
    keep = x.mean(dim=dims, keepdim=True)
    return keep.squeeze(dims), (x - keep).square().mean(dim=dims)


def mix_moments(mean0: torch.Tensor, var0: torch.Tensor, b_mean: torch.Tensor, b_var: torch.Tensor,
                m: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"ema"`` merge of a stream's statistics (``mean0``, ``var0``) with a batch's, with momentum ``m`` (a float,
    or a tensor broadcastable to the statistics: one momentum per stream), as two populations."""
    if isinstance(m, torch.Tensor):   # computed in the momentum's precision, applied in the statistics'
        d = b_mean.dtype
        return _mix(mean0, var0, b_mean, b_var, m.to(d), (1.0 - m).to(d), (m * (1.0 - m)).to(d))
    return _mix(mean0, var0, b_mean, b_var, m, 1.0 - m, m * (1.0 - m))


def _mix(mean0, var0, b_mean, b_var, m, one_m, mm) -> tuple[torch.Tensor, torch.Tensor]:
    mean = one_m * mean0 + m * b_mean
    var = one_m * var0 + m * b_var + mm * (b_mean - mean0).pow(2)
    return mean, var


class _Call:
    """The statistics of one ``use`` block; ``m``: each layer's momentum for this request."""

    def __init__(self, stats: dict[str, torch.Tensor], m: dict[str, float | torch.Tensor], record: bool,
                 onehot: torch.Tensor | None = None, cm: dict[str, torch.Tensor] | None = None) -> None:
        self.stats, self.m, self.record = stats, m, record
        self.onehot, self.cm = onehot, cm     # balanced: the request's labels (n, K) and class momenta per layer
        self.updates: dict[str, torch.Tensor] = {}


class StreamNormStats:
    """Per-stream statistics for every BatchNorm layer of ``model`` (see the module docstring).

    Args:
        model: the engine's private model copy (eval mode); its BatchNorm running statistics are the source's.
        mode: one of :data:`BN_MODES`.
        momentum: per-image momentum of ``"ema"`` (0 < momentum <= 1); of the deepest layer when
            ``shallow_momentum`` is given.
        shallow_momentum: per-image momentum of the first BatchNorm layer (None: every layer ``momentum``);
            the layers in between interpolate geometrically (:func:`layer_momenta`).
        prior_images: the warm-up's prior strength N0 in images (> 0; None: no warm-up), see the module
            docstring; the stream's count is the statistics entry ``seen``.
        warm_start: whether a stream (and a restart from source) starts in the warm-up (count 0); False: with the
            warm-up over (:attr:`warm_done`), so only a caller that sets the count to 0 starts one (the engine's
            domain-shift restart, ``EngineConfig.bn_warmup_shift``).
        balanced: weight lambda in (0, 1] of the class-balanced statistics (module docstring); None: off.
        num_classes: the model's classes K (needed with ``balanced``).
        balanced_form: a key of :data:`BALANCED_FORMS` (how the class statistics enter).
        confidence: with ``balanced``: the confidence gate tau in (0, 1) (module docstring): only images whose
            pre-pass max softmax probability is at least tau get a class (:meth:`pseudo_labels`); None: all do.
        agree: with ``balanced``: the agreement gate (module docstring): only images whose pre-pass label is the
            source model's label get a class (with ``confidence``: and are confident).
        share: with ``"correction"`` and a gate (``confidence`` or ``agree``): the share fade s0 in (0, 0.5]
            (module docstring, :func:`share_weight`); None: the weight is lambda x the recent gated share.
    """

    #: the statistics entry that counts the images merged since the source (with ``prior_images``)
    SEEN = "seen"
    #: with ``balanced`` and ``prior_images``: the per-class image counts of the class statistics' warm-up
    CSEEN = "cseen"

    def __init__(self, model: nn.Module, mode: str, momentum: float = 0.05,
                 shallow_momentum: float | None = None, prior_images: float | None = None,
                 warm_start: bool = True, balanced: float | None = None, num_classes: int = 0,
                 balanced_form: str = "mixture", confidence: float | None = None, agree: bool = False,
                 share: float | None = None) -> None:
        if balanced_form not in BALANCED_FORMS:
            raise ValueError(f"bn_balanced_form must be one of {sorted(BALANCED_FORMS)}, not {balanced_form!r}")
        self.form = BALANCED_FORMS[balanced_form]
        if balanced is not None and not (0.0 < float(balanced) <= 1.0 and int(num_classes) >= 2):
            raise ValueError(f"bn_balanced must be in (0, 1] and needs a model of >= 2 classes, got {balanced} "
                             f"with {num_classes} classes")
        self.balanced = None if balanced is None else float(balanced)
        self.num_classes = int(num_classes)
        if confidence is not None and not (balanced is not None and 0.0 < float(confidence) < 1.0):
            raise ValueError(f"bn_balanced_confidence must be in (0, 1) and needs bn_balanced, got {confidence} "
                             f"with bn_balanced {balanced}")
        self.confidence = None if confidence is None else float(confidence)
        if agree and balanced is None:
            raise ValueError("bn_balanced_agree needs bn_balanced (the class statistics it gates)")
        self.agree = bool(agree)
        if share is not None and not (0.0 < float(share) <= 0.5 and self.gated and self.form.tracks_mix):
            raise ValueError(f"bn_balanced_share must be in (0, 0.5] and needs bn_balanced_form 'correction' with a "
                             f"gate (bn_balanced_confidence or bn_balanced_agree), got {share}")
        self.share = None if share is None else float(share)
        if prior_images is not None and not float(prior_images) > 0:
            raise ValueError(f"bn_prior_images must be > 0 or None, got {prior_images}")
        self.prior_images = None if prior_images is None else float(prior_images)
        self.warm_start = bool(warm_start)
        if mode not in BN_MODES:
            raise ValueError(f"bn_stats must be one of {BN_MODES}, not {mode!r}")
        self.layers: dict[str, _BatchNorm] = {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm)}
        self.mode, self.momentum = mode, float(momentum)
        self.shallow_momentum = None if shallow_momentum is None else float(shallow_momentum)
        #: per-image momentum of each layer (module order = depth order for sequential backbones)
        self.momenta = dict(zip(self.layers, layer_momenta(len(self.layers), momentum, shallow_momentum),
                                strict=True))
        if not self.layers:   # validate the values even without BatchNorm layers
            layer_momenta(2, momentum, shallow_momentum)
        self.source: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._units: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, bn in self.layers.items():
            if bn.running_mean is None or bn.running_var is None:
                raise ValueError(f"BatchNorm layer {name!r} has no running statistics (source statistics needed)")
            self.source[name] = (bn.running_mean.detach().clone(), bn.running_var.detach().clone())
            self._units[name] = (torch.zeros_like(self.source[name][0]), torch.ones_like(self.source[name][1]))
            if mode == "batch":  # normalise with the batch unless a hook installs statistics
                bn.track_running_stats = False
                bn.running_mean = bn.running_var = None
                bn.num_batches_tracked = None
            bn.register_forward_pre_hook(self._pre_hook(name))
            bn.register_forward_hook(self._post_hook(name))
        self._call: _Call | None = None

    @property
    def per_stream(self) -> bool:
        """True when the layers keep per-stream statistics (a BatchNorm model in mode "ema")."""
        return bool(self.layers) and self.mode == "ema"

    @property
    def gated(self) -> bool:
        """True when a gate (``confidence`` or ``agree``) may leave pre-pass images without a class."""
        return self.confidence is not None or self.agree

    @property
    def balanced_on(self) -> bool:
        """True when the per-stream statistics include class-balanced ones (``balanced`` in mode ``"ema"``)."""
        return self.per_stream and self.balanced is not None

    @property
    def images_independent(self) -> bool:
        """True when an image's logits do not depend on the other images of its forward pass (no BatchNorm layer
        normalises with the batch's statistics when the stream's are given with ``update=False``): such
        forwards of several streams may be concatenated into one."""
        return not (self.layers and self.mode == "batch")

    @property
    def source_outside_use(self) -> bool:
        """True when a plain forward of the model outside :meth:`use` normalises every BatchNorm layer with the
        source running statistics (modes ``"source"`` and ``"ema"``, or no BatchNorm layer): the frozen model is
        then the source model as it is, with no hook work (``AdaptationEngine.source_predict``)."""
        return self.images_independent

    def init_state(self) -> dict[str, torch.Tensor]:
        """A new stream's statistics (the source's), keyed ``<layer>.mean`` / ``<layer>.var``."""
        if not self.per_stream:
            return {}
        out = {}
        for name, (mean, var) in self.source.items():
            out[f"{name}.mean"], out[f"{name}.var"] = mean.clone(), var.clone()
            if self.balanced_on:
                k = self.num_classes
                out[f"{name}.cmean"], out[f"{name}.cvar"] = mean.expand(k, -1).clone(), var.expand(k, -1).clone()
                if self.form.tracks_mix:      # the recent class mix starts uniform (the source's assumption)
                    out[f"{name}.cmix"] = torch.full((k,), 1.0 / k, dtype=mean.dtype, device=mean.device)
        if self.prior_images is not None:
            start = 0.0 if self.warm_start else self.warm_done
            dev = next(iter(self.source.values()))[0].device
            out[self.SEEN] = torch.full((), start, dtype=torch.float64, device=dev)
            if self.balanced_on:
                out[self.CSEEN] = torch.full((self.num_classes,), start, dtype=torch.float64, device=dev)
        return out

    @property
    def warm_done(self) -> float:
        """A count at which every layer's warm-up is over (the source's statistics then merge at the layers' own
        momenta); the count a stream starts with when ``warm_start`` is False."""
        return float(math.ceil(1.0 / min(self.momenta.values(), default=1.0)))

    def _momentum(self, name: str, n_images: int, seen: float | torch.Tensor | None) -> float | torch.Tensor:
        """Layer ``name``'s momentum for a request of ``n_images`` (after ``seen`` images, with the warm-up)."""
        if self.prior_images is None or seen is None:
            return batch_momentum(self.momenta[name], n_images)
        return warm_momentum(self.momenta[name], n_images, seen, self.prior_images)

    def advance(self, stats: dict[str, torch.Tensor], n_images: int, update: bool | torch.Tensor = True,
                counts: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The count entries after a request of ``n_images`` (``update`` False/0: unchanged; ``counts``: its images
        per class, (..., K), for the class counts of the balanced statistics); {} without warm-up."""
        if self.prior_images is None or self.SEEN not in stats:
            return {}
        gate = update.to(torch.float64) if isinstance(update, torch.Tensor) else float(bool(update))
        out = {self.SEEN: stats[self.SEEN] + gate * int(n_images)}
        if counts is not None and self.CSEEN in stats:
            g = gate.unsqueeze(-1) if isinstance(gate, torch.Tensor) else gate
            out[self.CSEEN] = stats[self.CSEEN] + g * counts.to(torch.float64)
        return out

    def class_momenta(self, counts: torch.Tensor, update: bool | torch.Tensor,
                      seen: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Each layer's per-class momenta (float64, the shape of ``counts``: (..., K)) for a request with
        ``counts`` images per class, times the gate ``update`` (a bool, or a (...)-shaped 0/1 tensor)."""
        gate = update.to(torch.float64).unsqueeze(-1) if isinstance(update, torch.Tensor) else float(bool(update))
        return {k: gate * class_momentum(m, counts, seen, self.prior_images) for k, m in self.momenta.items()}

    def pseudo_labels(self, logits: torch.Tensor, source_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The pseudo-labels of pre-pass ``logits`` (..., K): the argmax, and -1 (no class: a zero one-hot row)
        where the confidence gate finds the max softmax probability below ``confidence``, or the agreement gate
        finds the label differs from the argmax of ``source_logits`` (the source model's logits of the same images,
        required with ``agree``)."""
        labels = logits.argmax(-1)
        if not self.gated:
            return labels
        keep = torch.ones_like(labels, dtype=torch.bool)
        if self.confidence is not None:
            keep &= logits.softmax(-1).amax(-1) >= self.confidence
        if self.agree:
            if source_logits is None or source_logits.shape != logits.shape:
                raise ValueError("the agreement gate needs the source model's logits of the same images")
            keep &= labels == source_logits.argmax(-1)
        return torch.where(keep, labels, torch.full_like(labels, -1))

    def one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels`` (..., n) as one-hot float32 rows (..., n, K) (vmap-friendly: a comparison, no scatter); a label
        -1 (unconfident, :meth:`pseudo_labels`) is a zero row."""
        return (labels.unsqueeze(-1) == torch.arange(self.num_classes, device=labels.device)).to(torch.float32)

    def request_momenta(self, n_images: int, update: bool | torch.Tensor = True,
                        seen: float | torch.Tensor | None = None) -> dict[str, float | torch.Tensor]:
        """Each layer's momentum for a request of ``n_images`` images: ``batch_momentum(m_layer, n_images)`` (with
        the warm-up and a count ``seen``: :func:`warm_momentum`), times ``update`` (False/0: the statistics are
        read, not moved; a 0-dim 0/1 tensor under vmap)."""
        if isinstance(update, torch.Tensor):
            return {k: update * self._momentum(k, n_images, seen) for k in self.momenta}
        return {k: (self._momentum(k, n_images, seen) if update else 0.0) for k in self.momenta}

    @contextmanager
    def use(self, stats: dict[str, torch.Tensor], n_images: int, record: bool = True,
            update: bool | torch.Tensor = True, labels: torch.Tensor | None = None) -> Iterator[dict]:
        """Within the block, the hooked layers normalise with ``stats`` mixed with the batch (see the module
        docstring; ``update=False``: with ``stats`` as they are); the yielded dict receives the updated statistics
        when ``record``. Enter it only while holding the engine's forward lock (the hooks are shared).

        ``update`` may be a 0-dim 0/1 tensor: under ``torch.func.vmap`` (one stream per vmapped row) ``stats`` and
        ``update`` are the stream's rows, so one block serves many streams, each mixed with its own images'
        statistics only.

        With balanced statistics (:attr:`balanced_on`) ``labels`` (n,) are the request's pseudo-labels; they are
        required when ``update`` is True (None with a tensor gate or False: the class statistics are only read)."""
        m: dict[str, float | torch.Tensor] = (self.request_momenta(n_images, update, stats.get(self.SEEN))
                                              if self.mode == "ema" else dict.fromkeys(self.layers, 1.0))
        onehot = cm = counts = None
        if self.balanced_on and stats:
            if labels is None and update is True:
                raise ValueError("balanced statistics need the request's pseudo-labels to update")
            if labels is not None:
                onehot = self.one_hot(labels)
                counts = onehot.sum(0).to(torch.float64)
                cm = self.class_momenta(counts, update, stats.get(self.CSEEN))
        call = _Call(stats, m, record, onehot, cm)
        if record and self.per_stream:
            call.updates.update(self.advance(stats, n_images, update, counts))
        prev, self._call = self._call, (call if self.layers and self.mode != "source" else None)
        try:
            yield call.updates
        finally:
            self._call = prev

    def segment_prior(self, name: str, xs: torch.Tensor, stats: dict[str, torch.Tensor],
                      updates: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """What BatchNorm layer ``name`` normalises each segment of ``xs`` (S, n, C, ...) with, as the hooks do
        for segment s alone inside ``use(stats_s, n, update=updates[s])`` (``stats_s``: row s of ``stats``,
        ``{"<layer>.mean": (S, C), ...}``, missing: the source's; ``updates``: (S,) 0/1 gates, None: all 0): the
        segment's own batch statistics (over its images only) merged by :func:`mix_moments` with ``(mean0,
        var0)`` at momentum ``m`` ((S, 1), float64: the gate times the layer's ``batch_momentum`` for n images),
        returned as ``(mean0, var0, m)``; in ``"batch"`` m = 1 (the batch's alone). None where no batch
        statistics enter (``"source"``, or one value per channel in ``"batch"``): the source statistics
        ``self.source[name]`` then. Used by :mod:`mgg_core.segments`, which records the merged statistics of
        ``"ema"`` (:attr:`per_stream`) as ``use`` does."""
        if self.mode == "source":
            return None
        mean_src, var_src = self.source[name]
        rows = xs.shape[0]
        if self.mode == "batch":
            if xs[0].numel() // max(1, xs.shape[2]) <= 1:
                return None
            ones = torch.ones(rows, 1, dtype=torch.float64, device=xs.device)
            return torch.zeros_like(mean_src), torch.zeros_like(var_src), ones
        gate = torch.zeros(rows, dtype=torch.float64, device=xs.device) if updates is None else updates
        seen = stats.get(self.SEEN)
        mom = self._momentum(name, xs.shape[1], None if seen is None else seen.reshape(rows, 1))
        m = gate.to(torch.float64).reshape(rows, 1) * mom
        mean0, var0 = stats.get(f"{name}.mean", mean_src), stats.get(f"{name}.var", var_src)
        return mean0, var0, m

    # ------------------------------------------------------------------------------------------ hooks
    def _pre_hook(self, name: str):
        def hook(bn: _BatchNorm, inputs):
            call = self._call
            if call is None:
                return None
            x = inputs[0]
            single = x.numel() // max(1, x.shape[1]) <= 1
            if self.mode == "batch":
                if not single:
                    return None  # plain batch statistics (the layer has no running statistics in this mode)
                bn._buffers["running_mean"], bn._buffers["running_var"] = self.source[name]
                return None
            mean0, var0 = call.stats[f"{name}.mean"], call.stats[f"{name}.var"]
            # one value per channel is a valid (zero-variance) population: the merge still holds
            b_mean, b_var = batch_moments(x, [0] + list(range(2, x.dim())))
            mean, var = mix_moments(mean0, var0, b_mean, b_var, call.m[name])
            first = call.record and f"{name}.mean" not in call.updates
            if first:
                call.updates[f"{name}.mean"], call.updates[f"{name}.var"] = mean.detach(), var.detach()
            if self.balanced_on:
                mean, var = self._balanced(name, call, x, mean, var, first)
            # native batch_norm takes no gradient through running statistics: normalise here, and let the layer
            # (whatever it adds after the affine, e.g. timm's activation) run on unit statistics
            shape = (1, -1) + (1,) * (x.dim() - 2)
            eps = bn.eps
            x_hat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * math.sqrt(1.0 + eps)
            bn._buffers["running_mean"], bn._buffers["running_var"] = self._unit(name)
            return (x_hat,) + tuple(inputs[1:])
        return hook

    def _balanced(self, name: str, call: _Call, x: torch.Tensor, gmean: torch.Tensor, gvar: torch.Tensor,
                  record: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The hook's balanced statistics of layer ``name`` (module docstring) for one stream's batch ``x`` (n, C,
        ...), merged with the global ones (``gmean``, ``gvar``); the class statistics recorded when ``record``."""
        cmean, cvar = call.stats[f"{name}.cmean"], call.stats[f"{name}.cvar"]
        mix = call.stats.get(f"{name}.cmix")
        if call.onehot is not None and call.cm is not None:
            xs = x.reshape(1, x.shape[0], x.shape[1], -1)
            c_mean, c_var = class_moments(xs, call.onehot.unsqueeze(0))
            cmean, cvar = mix_moments(cmean, cvar, c_mean[0], c_var[0], call.cm[name].unsqueeze(-1))
            if mix is not None:       # the recent class mix moves with the global statistics' momentum
                mix = self._next_mix(mix, call.onehot.mean(0), call.m[name])
            if record:
                call.updates[f"{name}.cmean"], call.updates[f"{name}.cvar"] = cmean.detach(), cvar.detach()
                if mix is not None:
                    call.updates[f"{name}.cmix"] = mix.detach()
        return self._form(gmean, gvar, cmean, cvar, mix)

    def _form(self, gmean: torch.Tensor, gvar: torch.Tensor, cmean: torch.Tensor, cvar: torch.Tensor,
              mix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The form's normalising statistics (:class:`BalancedForm`) with this engine's lambda, gate and fade."""
        assert self.balanced is not None
        return self.form.fn(gmean, gvar, cmean, cvar, mix, self.balanced, self.gated, self.share)

    @staticmethod
    def _next_mix(mix: torch.Tensor, frac: torch.Tensor, m: float | torch.Tensor) -> torch.Tensor:
        """The recent class mix after a request whose class fractions are ``frac``, at momentum ``m`` (float, or a
        tensor broadcastable against ``mix`` after a trailing unsqueeze: one per stream)."""
        mm = m.to(mix.dtype) if isinstance(m, torch.Tensor) else m
        return (1.0 - mm) * mix + mm * frac

    def segment_balanced(self, name: str, xs: torch.Tensor, stats: dict[str, torch.Tensor],
                         updates: torch.Tensor | None, labels: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The balanced statistics layer ``name`` normalises each segment of ``xs`` (S, n, C, R) with, as the hooks
        do per stream (:meth:`segment_prior`'s contract; ``labels``: (S, n) pseudo-labels, None: the class
        statistics only read, which needs all gates 0): ``(mean, var)`` (S, C) with their gradient, and the
        updated statistics ``{"<layer>.mean"/".var"/".cmean"/".cvar": ...}`` (detached)."""
        prior = self.segment_prior(name, xs, stats, updates)
        assert prior is not None and self.balanced is not None
        mean0, var0, m = prior
        b_mean, b_var = batch_moments(xs, [1, 3])
        gmean, gvar = mix_moments(mean0, var0, b_mean, b_var, m)
        src_mean, src_var = self.source[name]
        k, rows = self.num_classes, xs.shape[0]
        cmean = stats.get(f"{name}.cmean", src_mean.expand(rows, k, -1))
        cvar = stats.get(f"{name}.cvar", src_var.expand(rows, k, -1))
        mix = stats.get(f"{name}.cmix")
        if mix is None and self.form.tracks_mix:
            mix = torch.full((rows, k), 1.0 / k, dtype=src_mean.dtype, device=xs.device)
        if labels is not None:
            onehot = self.one_hot(labels)
            gate = torch.zeros(rows, dtype=torch.float64, device=xs.device) if updates is None else updates
            seen = stats.get(self.CSEEN)
            cm = gate.to(torch.float64).unsqueeze(-1) * class_momentum(
                self.momenta[name], onehot.sum(1), seen, self.prior_images)
            c_mean, c_var = class_moments(xs, onehot)
            cmean, cvar = mix_moments(cmean, cvar, c_mean, c_var, cm.unsqueeze(-1))
            if mix is not None:
                mix = self._next_mix(mix, onehot.mean(1), m)        # m: (S, 1)
        mean, var = self._form(gmean, gvar, cmean, cvar, mix)
        recorded = {f"{name}.mean": gmean.detach(), f"{name}.var": gvar.detach(),
                    f"{name}.cmean": cmean.detach(), f"{name}.cvar": cvar.detach()}
        if mix is not None:
            recorded[f"{name}.cmix"] = mix.detach()
        return mean, var, recorded

    def _unit(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._units[name]

    def _post_hook(self, name: str):
        def hook(bn: _BatchNorm, inputs, output):
            if self._call is None:
                return None
            if self.mode == "batch":
                bn._buffers["running_mean"] = bn._buffers["running_var"] = None
            else:
                bn._buffers["running_mean"], bn._buffers["running_var"] = self.source[name]
            return None
        return hook
