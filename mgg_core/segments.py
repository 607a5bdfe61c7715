"""Segment-wise norm layers: several streams' requests of one shape as ONE plain batch through the shared backbone.

Contract. The backbone is frozen and shared; per stream only the adapted norm layers differ (their affine
parameters, rows of the stacked ``thetas``; BatchNorm's statistics). :class:`SegmentNorms` takes the engine's model
copy and finds its *segment layers*: every norm layer holding adapted scalars and every BatchNorm layer (whose
statistics are per stream even without an affine). Inside ``SegmentNorms.use(thetas, stats, updates)`` (S streams),
a forward of the model on S*n images, stream s's images being rows ``s*n .. s*n+n-1`` (its *segment*), gives
segment s exactly what the plain forward of stream s's images alone gives with adapted scalars ``thetas[s]``,
BatchNorm statistics ``stats[...][s]`` and update gate ``updates[s]`` (:mod:`mgg_core.normstats`: batch statistics
over the segment's own images only, mixed with the stream's at each layer's momentum), within float rounding.
Gradients reach ``thetas[s]`` only through segment s's rows, so one backward of the summed losses gives the stacked
gradient (row s = stream s).

Every other layer (convolutions, linears, attention) runs once on the whole batch. That is exact only when those
layers treat images independently (no batch-level mixing outside the norm layers: true of timm's classifiers in
eval mode); layer types with no segment implementation make :attr:`SegmentNorms.supported` False, and the engine
then keeps its generic ``torch.func.vmap`` path (``AdaptationEngine.step_many``).

Which layer types have a segment implementation is data: :data:`SEGMENT_NORMS`, keyed by *exact* type (a subclass
may change the forward, e.g. timm's ``LayerNorm2d`` permutes channels, so it needs its own entry). Mechanism: the
segment layers' ``forward`` is swapped for the segment one for the duration of ``use`` (an instance attribute, so
the module's hooks, feature taps included, still run); enter it only while holding the engine's forward lock.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm import layers as _timm_layers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .normstats import StreamNormStats, batch_moments, mix_moments
from .params import ParamSpec, is_norm_layer

__all__ = ["SEGMENT_NORMS", "SegmentImpl", "SegmentNorms"]


@dataclass
class _Segments:
    """One ``use`` block: S streams' adapted affines (name -> (S, *shape)), BatchNorm statistics and update
    gates."""

    count: int
    affine: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    gates: torch.Tensor | None
    norm: StreamNormStats
    labels: torch.Tensor | None = None      # (S, n) pseudo-labels of the balanced statistics (None: only read)
    updates: dict[str, torch.Tensor] = field(default_factory=dict)


def _rows(t: torch.Tensor, dim: int, lead: int) -> torch.Tensor:
    """A per-stream parameter ``t`` (S, *p) viewed to broadcast against a (S, n, ...) view of ``dim`` dimensions
    whose parameter dimensions start at ``lead``."""
    core = tuple(t.shape[1:])
    return t.reshape((t.shape[0],) + (1,) * (lead - 1) + core + (1,) * (dim - lead - len(core)))


def _affine(seg: _Segments, name: str, y: torch.Tensor, lead: int) -> torch.Tensor:
    """``y`` (S*n, ...) with each segment's affine of layer ``name`` applied; parameter dimensions from ``lead``
    of the (S, n, ...) view."""
    w, b = seg.affine.get(f"{name}.weight"), seg.affine.get(f"{name}.bias")
    ys = y.reshape(seg.count, -1, *y.shape[1:])
    if w is not None and b is not None:
        return torch.addcmul(_rows(b, ys.dim(), lead), ys, _rows(w, ys.dim(), lead)).reshape(y.shape)
    if w is not None:
        ys = ys * _rows(w, ys.dim(), lead)
    if b is not None:
        ys = ys + _rows(b, ys.dim(), lead)
    return ys.reshape(y.shape)


class _MixedBatchNorm(torch.autograd.Function):
    """Per segment of ``xs`` (S, n, C, R): batch statistics over (n, R), merged with the stream's (``mean0``,
    ``var0``) at momentum ``m`` ((S, 1)) by :func:`normstats.mix_moments`; ``y = (x - mean) * rsqrt(var + eps) * w
    + b``. The composite of these ops, with a closed-form backward (two reductions and two fused passes instead of
    autograd's dozen elementwise passes through the merge). Returns ``(y, mean, var)``; the statistics are not
    differentiable outputs, ``mean0``/``var0``/``m`` (a stream's state) take no gradient."""

    @staticmethod
    def forward(ctx, xs, w, b, mean0, var0, m, eps):
        b_mean, b_var = batch_moments(xs, [1, 3])
        mean, var = mix_moments(mean0, var0, b_mean, b_var, m)
        r = torch.rsqrt(var + eps)
        scale = r if w is None else r * w
        xc = xs - mean[:, None, :, None]
        y = xc * scale[:, None, :, None] if b is None else torch.addcmul(b[:, None, :, None], xc,
                                                                          scale[:, None, :, None])
        ctx.has_w, ctx.has_b = w is not None, b is not None
        ctx.save_for_backward(xc, r, w, scale, mean - b_mean, b_mean - mean0, m)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, gy, _g_mean, _g_var):
        xc, r, w, scale, shift, spread, m64 = ctx.saved_tensors
        g_b = gy.sum(dim=(1, 3))
        g_xc = (gy * xc).sum(dim=(1, 3))
        grad_x = None
        if ctx.needs_input_grad[0]:
            m, mm = m64.to(xc.dtype), (m64 * (1.0 - m64)).to(xc.dtype)
            d_var = (g_xc if w is None else g_xc * w) * (-0.5 * r.pow(3))
            d_bmean = -m * scale * g_b + 2.0 * mm * spread * d_var     # through mean and the merged variance
            count = xc.shape[1] * xc.shape[3]
            alpha, beta = d_bmean / count, 2.0 * m * d_var / count      # d mean_b / dx, d var_b / dx
            # dx = gy * scale + alpha + beta * (x - mean_b), with x - mean_b = xc + (mean - mean_b)
            grad_x = torch.addcmul((alpha + beta * shift)[:, None, :, None], xc, beta[:, None, :, None])
            grad_x.addcmul_(gy, scale[:, None, :, None])
        grad_w = g_xc * r if ctx.has_w else None
        return grad_x, grad_w, (g_b if ctx.has_b else None), None, None, None, None


def _batch_norm(seg: _Segments, name: str, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm (any ``_BatchNorm``) per segment: the statistics :meth:`StreamNormStats.segment_prior` says (the
    ``"ema"`` merge recorded as ``use`` records it), each stream's affine."""
    xs = x.reshape(seg.count, -1, x.shape[1], math.prod(x.shape[2:]))
    w, b = seg.affine.get(f"{name}.weight"), seg.affine.get(f"{name}.bias")
    if seg.norm.balanced_on:
        return _balanced_batch_norm(seg, name, xs, w, b, bn.eps).reshape(x.shape)
    prior = seg.norm.segment_prior(name, xs, seg.stats, seg.gates)
    if prior is not None:
        y, mean, var = _MixedBatchNorm.apply(xs, w, b, *prior, bn.eps)
        if seg.norm.per_stream and f"{name}.mean" not in seg.updates:
            seg.updates[f"{name}.mean"], seg.updates[f"{name}.var"] = mean, var
            seen = seg.stats.get(StreamNormStats.SEEN)
            if seen is not None and StreamNormStats.SEEN not in seg.updates:   # the warm-up's count, once per block
                gates = torch.zeros_like(seen) if seg.gates is None else seg.gates
                seg.updates.update(seg.norm.advance(seg.stats, xs.shape[1], gates))
        return y.reshape(x.shape)
    mean, var = seg.norm.source[name]      # fixed statistics: each stream's affine only
    scale = torch.rsqrt(var + bn.eps)
    scale = scale.expand(seg.count, -1) if w is None else scale * w
    centred = xs - mean[:, None]
    if b is None:
        return (centred * scale[:, None, :, None]).reshape(x.shape)
    return torch.addcmul(b[:, None, :, None], centred, scale[:, None, :, None]).reshape(x.shape)


def _balanced_batch_norm(seg: _Segments, name: str, xs: torch.Tensor, w: torch.Tensor | None,
                         b: torch.Tensor | None, eps: float) -> torch.Tensor:
    """BatchNorm per segment with class-balanced statistics (:meth:`StreamNormStats.segment_balanced`; plain
    autograd: no closed-form backward), recorded as ``use`` records them."""
    mean, var, recorded = seg.norm.segment_balanced(name, xs, seg.stats, seg.gates, seg.labels)
    scale = torch.rsqrt(var + eps)
    if w is not None:
        scale = scale * w
    y = (xs - mean[:, None, :, None]) * scale[:, None, :, None]
    if b is not None:
        y = y + b[:, None, :, None]
    if f"{name}.mean" not in seg.updates:
        if seg.labels is None:      # the class statistics were only read
            recorded = {k: v for k, v in recorded.items() if not k.endswith((".cmean", ".cvar", ".cmix"))}
        seg.updates.update(recorded)
        seen = seg.stats.get(StreamNormStats.SEEN)
        if seen is not None and StreamNormStats.SEEN not in seg.updates:   # the warm-up's counts, once per block
            gates = torch.zeros_like(seen) if seg.gates is None else seg.gates
            counts = None if seg.labels is None else seg.norm.one_hot(seg.labels).sum(1)
            seg.updates.update(seg.norm.advance(seg.stats, xs.shape[1], gates, counts))
    return y


def _layer_norm(seg: _Segments, name: str, ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm: normalises each image on its own (one call on the whole batch), each stream's affine."""
    y = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
    return _affine(seg, name, y, 1 + x.dim() - len(ln.normalized_shape))


def _group_norm(seg: _Segments, name: str, gn: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm: normalises each image on its own (one call on the whole batch), each stream's affine."""
    return _affine(seg, name, F.group_norm(x, gn.num_groups, None, None, gn.eps), 2)


@dataclass(frozen=True)
class SegmentImpl:
    """A layer type's segment forward ``fn(segments, layer_name, module, x)``, then the module's submodules named in
    ``after`` that exist, in order (timm's ``*Act`` layers: dropout and activation after the affine)."""

    fn: Callable[..., torch.Tensor]
    after: tuple[str, ...] = ()


_ACT = ("drop", "act")

#: Exact layer type -> its segment implementation (see the module docstring). Types not listed (and subclasses
#: of listed ones) have none: a model holding one adapts through the vmap path.
SEGMENT_NORMS: dict[type, SegmentImpl] = {
    nn.BatchNorm1d: SegmentImpl(_batch_norm), nn.BatchNorm2d: SegmentImpl(_batch_norm),
    nn.BatchNorm3d: SegmentImpl(_batch_norm), _timm_layers.BatchNormAct2d: SegmentImpl(_batch_norm, _ACT),
    nn.LayerNorm: SegmentImpl(_layer_norm), _timm_layers.LayerNorm: SegmentImpl(_layer_norm),
    _timm_layers.LayerNormAct: SegmentImpl(_layer_norm, _ACT),
    nn.GroupNorm: SegmentImpl(_group_norm), _timm_layers.GroupNorm: SegmentImpl(_group_norm),
    _timm_layers.GroupNormAct: SegmentImpl(_group_norm, _ACT),
}


def _holds_adapted(spec: ParamSpec, name: str) -> bool:
    return f"{name}.weight" in spec.names or f"{name}.bias" in spec.names


class SegmentNorms:
    """The segment layers of ``model`` and the context that runs them per segment (see the module docstring).

    Args:
        model: the engine's private, frozen model copy.
        spec: the layout of the adapted scalars (``params.select_norm_params``).
        norm: the engine's BatchNorm statistics (mode, source statistics, the ``"ema"`` merge).
        table: layer type -> implementation (default :data:`SEGMENT_NORMS`).
    """

    def __init__(self, model: nn.Module, spec: ParamSpec, norm: StreamNormStats,
                 table: dict[type, SegmentImpl] | None = None) -> None:
        table = SEGMENT_NORMS if table is None else table
        self.spec, self.norm = spec, norm
        layers = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, _BatchNorm) or (is_norm_layer(m) and _holds_adapted(spec, n))]
        #: layers with no implementation (their type names): the model runs the vmap path when any
        self.missing = sorted({type(m).__name__ for _, m in layers if type(m) not in table})
        self.layers = [(n, m, table[type(m)]) for n, m in layers if type(m) in table]

    @property
    def supported(self) -> bool:
        """True when every segment layer's type has an implementation."""
        return not self.missing

    @contextmanager
    def use(self, thetas: torch.Tensor, stats: dict[str, torch.Tensor], updates: torch.Tensor | None,
            labels: torch.Tensor | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block the segment layers run per segment of ``thetas.shape[0]`` streams (``thetas``: (S,
        numel); ``stats``: ``{"<layer>.mean"/".var": (S, C)}``, as ``StreamNormStats`` keys them, may be empty;
        ``updates``: (S,) gates, 1 where a stream's statistics move with its images (at each layer's momentum,
        ``StreamNormStats.request_momenta``), 0 where they are only read; None: all 0). Yields the dict that
        receives the updated ``"ema"`` statistics, (S, C) per key. ``labels`` (S, n): the streams' pseudo-labels
        for class-balanced statistics (``StreamNormStats.balanced_on``). Hold the engine's forward lock."""
        if not self.supported:
            raise RuntimeError(f"no segment implementation for {', '.join(self.missing)}")
        seg = _Segments(thetas.shape[0], self.spec.stacked_views(thetas), stats, updates, self.norm, labels)
        saved = []
        try:
            for name, module, impl in self.layers:
                saved.append((module, module.__dict__.get("forward")))
                module.forward = partial(_run, impl, seg, name, module)
            yield seg.updates
        finally:
            for module, prev in saved:
                if prev is None:
                    del module.forward
                else:
                    module.forward = prev


def _run(impl: SegmentImpl, seg: _Segments, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = impl.fn(seg, name, module, x)
    for attr in impl.after:
        sub = getattr(module, attr, None)
        if sub is not None:
            y = sub(y)
    return y
