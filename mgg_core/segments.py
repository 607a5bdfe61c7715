"""Segment-wise norm layers: several streams' requests of one shape as ONE plain batch through the shared backbone.

Contract. The backbone is frozen and shared; per stream only the adapted norm layers differ (their affine
parameters, rows of the stacked ``thetas``; BatchNorm's statistics). :class:`SegmentNorms` takes the engine's model
copy and finds its *segment layers*: every norm layer holding adapted scalars and every BatchNorm layer (whose
statistics are per stream even without an affine). Inside ``SegmentNorms.use(thetas, stats, momenta)`` (S streams),
a forward of the model on S*n images, stream s's images being rows ``s*n .. s*n+n-1`` (its *segment*), gives
segment s exactly what the plain forward of stream s's images alone gives with adapted scalars ``thetas[s]``,
BatchNorm statistics ``stats[...][s]`` and momentum ``momenta[s]`` (:mod:`mgg_core.normstats`: batch statistics
over the segment's own images only, mixed with the stream's), within float rounding. Gradients reach ``thetas[s]``
only through segment s's rows, so one backward of the summed losses gives the stacked gradient (row s = stream s).

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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm import layers as _timm_layers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .normstats import StreamNormStats
from .params import ParamSpec, is_norm_layer

__all__ = ["SEGMENT_NORMS", "SegmentImpl", "SegmentNorms"]


@dataclass
class _Segments:
    """One ``use`` block: S streams' adapted affines (name -> (S, *shape)), BatchNorm statistics and momenta."""

    count: int
    affine: dict[str, torch.Tensor]
    stats: dict[str, torch.Tensor]
    momenta: torch.Tensor | None
    norm: StreamNormStats
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


def _batch_norm(seg: _Segments, name: str, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm (any ``_BatchNorm``) per segment: statistics from :meth:`StreamNormStats.segment_moments`,
    each stream's affine."""
    xs = x.reshape(seg.count, -1, *x.shape[1:])
    mean, var = seg.norm.segment_moments(name, xs, seg.stats, seg.momenta, seg.updates)
    scale = torch.rsqrt(var + bn.eps)
    w, b = seg.affine.get(f"{name}.weight"), seg.affine.get(f"{name}.bias")
    if w is not None:
        scale = scale * w
    shape = (-1, 1, x.shape[1]) + (1,) * (x.dim() - 2)
    centred = xs - mean.reshape(shape)
    if b is None:
        return (centred * scale.reshape(shape)).reshape(x.shape)
    return torch.addcmul(b.reshape(shape), centred, scale.reshape(shape)).reshape(x.shape)


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
    def use(self, thetas: torch.Tensor, stats: dict[str, torch.Tensor],
            momenta: torch.Tensor | None) -> Iterator[dict[str, torch.Tensor]]:
        """Within the block the segment layers run per segment of ``thetas.shape[0]`` streams (``thetas``: (S,
        numel); ``stats``: ``{"<layer>.mean"/".var": (S, C)}``, as ``StreamNormStats`` keys them, may be empty;
        ``momenta``: (S,), 0 where a stream's statistics do not move; None: all 0). Yields the dict that receives
        the updated ``"ema"`` statistics, (S, C) per key. Hold the engine's forward lock."""
        if not self.supported:
            raise RuntimeError(f"no segment implementation for {', '.join(self.missing)}")
        seg = _Segments(thetas.shape[0], self.spec.stacked_views(thetas), stats, momenta, self.norm)
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
