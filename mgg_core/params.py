"""Which parameters test-time adaptation may change: the affine weight and bias of normalisation layers.

Selection is by layer *type*, never by module-name substrings. The adapted scalars are held as one flat
vector per stream; :class:`ParamSpec` maps that vector to named views for ``torch.func.functional_call``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm import layers as _timm_layers
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# timm's norm layers that do not subclass a torch norm layer (those this timm version has)
_TIMM_NORMS: tuple[type, ...] = tuple(
    getattr(_timm_layers, name)
    for name in (
        "RmsNorm", "RmsNorm2d", "RmsNormFp32", "RmsNorm2dFp32", "SimpleNorm", "SimpleNorm2d",
        "SimpleNormFp32", "SimpleNorm2dFp32", "FrozenBatchNormAct2d",
    )
    if hasattr(_timm_layers, name)
)

#: Layer types whose affine parameters are adapted. timm's BatchNormAct2d, GroupNormAct, LayerNorm2d,
#: LayerNormAct... subclass the torch types and are covered through them.
NORM_TYPES: tuple[type, ...] = (_BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                nn.InstanceNorm3d, nn.LocalResponseNorm) + _TIMM_NORMS


#: Norm layer types whose per-stream affine parameters ``torch.func.vmap`` batches (checked by
#: tests/test_fused.py for each): an engine fuses streams (``AdaptationEngine.step_many``) only when every norm
#: layer that holds adapted scalars is one of these, and falls back to one step per stream otherwise.
FUSABLE_NORM_TYPES: tuple[type, ...] = NORM_TYPES


def is_norm_layer(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES)


def fusable_model(model: nn.Module, fusable_types: tuple[type, ...] | None = None) -> bool:
    """Whether every norm layer of ``model`` with adapted scalars is of a type in ``fusable_types``
    (default :data:`FUSABLE_NORM_TYPES`)."""
    types = FUSABLE_NORM_TYPES if fusable_types is None else fusable_types
    return all(isinstance(m, types) for m in model.modules()
               if is_norm_layer(m) and any(n in ("weight", "bias") for n, _ in m.named_parameters(recurse=False)))


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


@dataclass(frozen=True)
class ParamSpec:
    """Layout of the adapted scalars inside one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat`` (autograd flows back to ``flat``)."""
        return {
            name: flat[off: off + _prod(shape)].view(shape)
            for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True)
        }

    def stacked_views(self, flats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flats`` (S, numel), one row per stream: name -> (S, *shape) (autograd flows back)."""
        # one split (its backward: one concatenation), not a slice per parameter (each slice's backward writes a
        # zero-filled (S, numel) gradient and adds it up: 2 x names full-size passes)
        rows = flats.shape[0]
        parts = flats.split([_prod(shape) for shape in self.shapes], dim=1)
        return {name: part.reshape(rows, *shape) for name, shape, part in zip(self.names, self.shapes, parts,
                                                                             strict=True)}

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[name].detach().reshape(-1) for name in self.names])

    def layer_of(self, index: int) -> str:
        """Name of the parameter that holds flat index ``index``."""
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            if off <= index < off + _prod(shape):
                return name
        raise IndexError(index)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def select_norm_params(model: nn.Module) -> ParamSpec:
    """The affine parameters (weight, bias) of every normalisation layer of ``model``, in module order."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    offsets: list[int] = []
    total = 0
    for mod_name, module in model.named_modules():
        if not is_norm_layer(module):
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p_name not in ("weight", "bias") or p is None:
                continue
            names.append(f"{mod_name}.{p_name}" if mod_name else p_name)
            shapes.append(tuple(p.shape))
            offsets.append(total)
            total += p.numel()
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no normalisation layer with affine parameters "
            f"(looked for {', '.join(t.__name__ for t in NORM_TYPES)}); nothing to adapt"
        )
    return ParamSpec(tuple(names), tuple(shapes), tuple(offsets), total)


def initial_vector(model: nn.Module, spec: ParamSpec) -> torch.Tensor:
    params = dict(model.named_parameters())
    return spec.flatten({n: params[n] for n in spec.names}).clone()


def use_batch_statistics(model: nn.Module) -> int:
    """Make every BatchNorm layer normalise with the statistics of the current test batch (TENT's setting).

    Running statistics are dropped, so the shared backbone carries no per-stream state. Returns the number of
    layers changed.
    """
    layers = batchnorm_layers(model)
    for _, bn in layers:
        bn.track_running_stats = False
        bn.running_mean = None
        bn.running_var = None
        bn.num_batches_tracked = None
    return len(layers)
