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

Statistics live in the stream state (``StreamState.tensors``) under ``norm.<layer>.mean`` / ``.var``; ``use``
yields a dict that receives the updated statistics of the *first* forward pass within the block (later passes of
the same step, e.g. SAR's second pass or DeYO's shuffled images, read but do not update them). A step's statistics
are committed by the engine: a step rejected for non-finite values leaves them untouched, a request whose images
the method's filter rejected all still moves them (``engine.STATISTICS_DESPITE_SKIP``).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["BN_MODES", "StreamNormStats", "batch_moments", "batch_momentum", "layer_momenta", "mix_moments",
           "warm_momentum"]

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

    def __init__(self, stats: dict[str, torch.Tensor], m: dict[str, float | torch.Tensor], record: bool) -> None:
        self.stats, self.m, self.record = stats, m, record
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
    """

    #: the statistics entry that counts the images merged since the source (with ``prior_images``)
    SEEN = "seen"

    def __init__(self, model: nn.Module, mode: str, momentum: float = 0.05,
                 shallow_momentum: float | None = None, prior_images: float | None = None,
                 warm_start: bool = True) -> None:
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
        if self.prior_images is not None:
            start = 0.0 if self.warm_start else self.warm_done
            out[self.SEEN] = torch.full((), start, dtype=torch.float64,
                                        device=next(iter(self.source.values()))[0].device)
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

    def advance(self, stats: dict[str, torch.Tensor], n_images: int,
                update: bool | torch.Tensor = True) -> dict[str, torch.Tensor]:
        """The count entry after a request of ``n_images`` (``update`` False/0: unchanged); {} without warm-up."""
        if self.prior_images is None or self.SEEN not in stats:
            return {}
        gate = update.to(torch.float64) if isinstance(update, torch.Tensor) else float(bool(update))
        return {self.SEEN: stats[self.SEEN] + gate * int(n_images)}

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
            update: bool | torch.Tensor = True) -> Iterator[dict]:
        """Within the block, the hooked layers normalise with ``stats`` mixed with the batch (see the module
        docstring; ``update=False``: with ``stats`` as they are); the yielded dict receives the updated statistics
        when ``record``. Enter it only while holding the engine's forward lock (the hooks are shared).

        ``update`` may be a 0-dim 0/1 tensor: under ``torch.func.vmap`` (one stream per vmapped row) ``stats`` and
        ``update`` are the stream's rows, so one block serves many streams, each mixed with its own images'
        statistics only."""
        m: dict[str, float | torch.Tensor] = (self.request_momenta(n_images, update, stats.get(self.SEEN))
                                              if self.mode == "ema" else dict.fromkeys(self.layers, 1.0))
        call = _Call(stats, m, record)
        if record and self.per_stream:
            call.updates.update(self.advance(stats, n_images, update))
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
            if call.record and f"{name}.mean" not in call.updates:
                call.updates[f"{name}.mean"], call.updates[f"{name}.var"] = mean.detach(), var.detach()
            # native batch_norm takes no gradient through running statistics: normalise here, and let the layer
            # (whatever it adds after the affine, e.g. timm's activation) run on unit statistics
            shape = (1, -1) + (1,) * (x.dim() - 2)
            eps = bn.eps
            x_hat = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * math.sqrt(1.0 + eps)
            bn._buffers["running_mean"], bn._buffers["running_var"] = self._unit(name)
            return (x_hat,) + tuple(inputs[1:])
        return hook

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
