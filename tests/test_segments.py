"""Segment-wise norm layers (mgg_core/segments.py): S streams' images as one plain batch, each segment exactly as
its stream alone (issue 10).

Per layer type of ``SEGMENT_NORMS``: outputs, BatchNorm statistics updates and the gradient of every stream's
adapted scalars equal per-stream plain forwards (``StreamNormStats.use`` + ``functional_call``) within 1e-5, and a
segment's results do not move when another segment's images change. Per model: the engine's segment forward equals
its vmap forward (logits, feature taps, statistics, gradients). Types without an implementation (exact-type rule)
send the engine to the vmap path, with the same results.
"""
from __future__ import annotations

import functools

import pytest
import timm
import torch
from timm import layers as timm_layers
from torch import nn
from torch.func import functional_call

from mgg_core import segments
from mgg_core.classifier import default_checkpoint, load_classifier
from mgg_core.engine import FUSE_MAX_IMAGES, AdaptationEngine, EngineConfig
from mgg_core.normstats import StreamNormStats
from mgg_core.params import select_norm_params
from mgg_core.segments import SEGMENT_NORMS, SegmentNorms

TOL = 1e-5
S, N = 3, 4     # streams, images per stream


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _close(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = TOL) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


def _layer(cls: type) -> tuple[nn.Module, tuple[int, ...]]:
    """An instance of ``cls`` (8 channels, random affine and running statistics) and one image's shape."""
    if issubclass(cls, nn.modules.batchnorm._BatchNorm):
        layer = cls(8)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        shape = {nn.BatchNorm1d: (8, 5), nn.BatchNorm3d: (8, 2, 3, 3)}.get(cls, (8, 4, 4))
    elif issubclass(cls, nn.LayerNorm):
        layer, shape = cls(8), (5, 8)
    else:   # GroupNorm family (timm's take num_channels first)
        layer = cls(4, 8) if cls is nn.GroupNorm else cls(8, num_groups=4)
        shape = (8, 4, 4)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return layer.eval(), shape


def _per_stream(model, norm, spec, thetas, xs, stats, momenta):
    """Reference: each stream alone, plain forward with its own scalars and statistics."""
    outs, ups = [], []
    for s in range(thetas.shape[0]):
        row = {k: v[s] for k, v in stats.items()}
        with norm.use(row, xs.shape[1], update=momenta[s]) as upd:
            outs.append(functional_call(model, spec.views(thetas[s]), (xs[s],)))
        ups.append(dict(upd))
    return torch.stack(outs), {k: torch.stack([u[k] for u in ups]) for k in ups[0]} if ups[0] else {}


def _segmented(model, seg, thetas, xs, stats, momenta):
    with seg.use(thetas, stats, momenta) as upd:
        out = model(xs.reshape(-1, *xs.shape[2:]))
    return out.reshape(xs.shape[0], xs.shape[1], *out.shape[1:]), dict(upd)


def _setup(cls: type, mode: str):
    torch.manual_seed(0)
    layer, shape = _layer(cls)
    model = nn.Sequential(layer)
    norm = StreamNormStats(model, mode, 0.1)
    spec = select_norm_params(model)
    seg = SegmentNorms(model, spec, norm)
    assert seg.supported, seg.missing
    base = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    thetas = base + 0.2 * torch.randn(S, spec.numel)
    stats = {k: torch.stack([v + 0.1 * torch.rand(v.shape) for _ in range(S)]) for k, v in norm.init_state().items()}
    momenta = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)   # update gates; stream 1: statistics do not move
    xs = 1.5 * torch.randn(S, N, *shape) + 0.5
    return model, norm, spec, seg, thetas, stats, momenta, xs


def _with_grad(fn, thetas, xs=None):
    """``fn``'s outputs and statistics, and the gradient of a random functional of the outputs w.r.t. the
    adapted scalars (and, with ``xs``, w.r.t. the input images too: deeper layers' inputs carry gradients)."""
    th = thetas.clone().requires_grad_(True)
    inputs = (th,) if xs is None else (th, xs.clone().requires_grad_(True))
    out, upd = fn(*inputs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    return out.detach(), upd, grads[0], (None if xs is None else grads[1])


CASES = [(cls, mode) for cls in SEGMENT_NORMS
         for mode in (("ema", "batch", "source") if issubclass(cls, nn.modules.batchnorm._BatchNorm) else ("ema",))]


@pytest.mark.parametrize("cls,mode", CASES, ids=lambda c: getattr(c, "__name__", c))
def test_every_segment_type_equals_each_stream_alone(cls, mode):
    model, norm, spec, seg, thetas, stats, momenta, xs = _setup(cls, mode)
    ref = _with_grad(lambda th, x: _per_stream(model, norm, spec, th, x, stats, momenta), thetas, xs)
    got = _with_grad(lambda th, x: _segmented(model, seg, th, x, stats, momenta), thetas, xs)
    _close(got[0], ref[0], "outputs")
    assert got[1].keys() == ref[1].keys() and (bool(ref[1]) == (mode == "ema" and bool(norm.layers)))
    for k in ref[1]:
        _close(got[1][k], ref[1][k], f"statistics {k}")
    _close(got[2], ref[2], "gradient (S, numel)")
    _close(got[3], ref[3], "gradient w.r.t. the images")
    assert all(m.__dict__.get("forward") is None for m in model.modules()), "a swapped forward was left behind"


@pytest.mark.parametrize("affine", [True, False])
def test_mixed_batch_norm_backward_is_the_derivative_of_its_forward(affine):
    """The closed-form backward of the merged-statistics BatchNorm against finite differences (float64)."""
    gen = torch.Generator().manual_seed(0)
    xs = (torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64) * 2 + 1).requires_grad_(True)
    w = (torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(affine) if affine else None
    b = torch.randn(3, 5, generator=gen, dtype=torch.float64).requires_grad_(affine) if affine else None
    mean0, var0 = torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5, dtype=torch.float64) + 0.2
    m = torch.tensor([[0.3], [0.0], [1.0]], dtype=torch.float64)   # ema, a frozen stream, batch statistics alone

    def first(*a):
        return segments._MixedBatchNorm.apply(*a)[0]

    assert torch.autograd.gradcheck(first, (xs, w, b, mean0, var0, m, 1e-5))


@pytest.mark.parametrize("mode", ["ema", "batch"])
def test_a_segment_never_sees_another_segments_images(mode):
    model, norm, spec, seg, thetas, stats, momenta, xs = _setup(nn.BatchNorm2d, mode)
    a = _with_grad(lambda th: _segmented(model, seg, th, xs, stats, momenta), thetas)
    other = xs.clone()
    other[1] = 40.0 * other[1].pow(3) + 7.0   # stream 1's images only: far from the others' statistics (and not
    # an affine map of them, which batch statistics would normalise away)
    b = _with_grad(lambda th: _segmented(model, seg, th, other, stats, momenta), thetas)
    for s in (0, 2):
        _close(b[0][s], a[0][s], f"stream {s} outputs", 1e-6)
        _close(b[2][s], a[2][s], f"stream {s} gradient", 1e-6)
        for k in a[1]:
            _close(b[1][k][s], a[1][k][s], f"stream {s} {k}", 1e-6)
    assert not torch.allclose(b[2][1], a[2][1]), "stream 1's own gradient did not see its own images"
    if mode == "ema":   # the changed stream's momentum is 0: its statistics stay its own; stream 2's move
        _close(b[1]["0.mean"][1], stats["0.mean"][1], "stream 1 statistics (momentum 0)")
        assert not torch.allclose(a[1]["0.mean"][2], stats["0.mean"][2])


@functools.cache
def _model(kind: str) -> nn.Module:
    if kind == "gn":
        torch.manual_seed(0)
        return timm.create_model("test_resnet", num_classes=10, norm_layer=lambda c, **kw: nn.GroupNorm(8, c)).eval()
    return load_classifier(default_checkpoint(kind), device="cpu").model


@pytest.mark.parametrize("kind,method,bn_stats,shallow", [
    ("resnet", "foa", "ema", None), ("resnet", "tent", "ema", 0.3), ("resnet", "tent", "batch", None),
    ("vit", "foa", None, None), ("gn", "eata", None, None)])
def test_segment_forward_equals_vmap_forward(kind, method, bn_stats, shallow):
    # shallow: depth-dependent BatchNorm momenta (normstats.layer_momenta) reach each segment layer too
    cfg = EngineConfig(method=method, optimizer="sgd", bn_stats=bn_stats, bn_momentum_shallow=shallow)
    eng = AdaptationEngine(_model(kind), cfg, num_classes=10)
    assert eng.segment_fused
    torch.manual_seed(0)
    thetas = eng.theta0 + 0.05 * torch.randn(S, eng.spec.numel)
    norms = {k: torch.stack([v * (1 + 0.1 * s) for s in range(S)]) for k, v in eng._source_norm.items()}
    momenta = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)   # update gates
    xs = torch.randn(S, N, 3, 32, 32)
    features = eng.taps is not None
    results = {}
    for name, run in (("segment", eng._segment_forward), ("vmap", eng._vmap_forward)):
        th = thetas.clone().requires_grad_(True)
        logits, feats, upd = run(th, xs, norms, momenta, features)
        loss = logits.logsumexp(-1).sum() + (feats.square().mean() if feats is not None else 0)
        results[name] = logits.detach(), feats, upd, torch.autograd.grad(loss, th)[0]
    (lg, ft, up, gr), (lg2, ft2, up2, gr2) = results["segment"], results["vmap"]
    _close(lg, lg2, "logits")
    assert (ft is None) == (not features) and (ft2 is None) == (not features)
    if features:
        _close(ft.detach(), ft2.detach(), "features")
    assert up.keys() == up2.keys() and (bool(up) == eng.norm.per_stream)
    for k in up:
        _close(up[k], up2[k], k)
    _close(gr, gr2, "gradient")


def test_types_without_a_segment_implementation_take_the_vmap_path(monkeypatch):
    monkeypatch.setattr(segments, "SEGMENT_NORMS", {k: v for k, v in SEGMENT_NORMS.items() if k is not nn.GroupNorm})
    eng = AdaptationEngine(_model("gn"), EngineConfig(method="tent", lr=0.01), num_classes=10)
    assert eng.fused and not eng.segment_fused and eng.segments.missing == ["GroupNorm"]
    gen = torch.Generator().manual_seed(0)
    calls = [[torch.randn(4, 3, 32, 32, generator=gen) for _ in range(3)] for _ in range(2)]
    fused, alone = [eng.new_state(seed=s) for s in range(3)], [eng.new_state(seed=s) for s in range(3)]
    for xs in calls:
        got = eng.step_many(list(zip(fused, xs, strict=True)))
        for st, x, r in zip(alone, xs, got, strict=True):
            _close(r.logits, eng.step(st, x).logits, "logits")
    for a, b in zip(fused, alone, strict=True):
        _close(a.theta, b.theta, "theta")
    assert eng.fused_forwards["vmap"] == 2 and eng.fused_forwards["segment"] == 0
    with pytest.raises(RuntimeError, match="GroupNorm"), eng.segments.use(eng.theta0.expand(2, -1), {}, None):
        pass


def test_a_subclass_of_a_listed_type_has_no_implementation_of_its_own():
    # timm's LayerNorm2d subclasses nn.LayerNorm but normalises channels (permutes): exact types only
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.LayerNorm2d(8))
    seg = SegmentNorms(model, select_norm_params(model), StreamNormStats(model, "ema"))
    assert not seg.supported and seg.missing == ["LayerNorm2d"]


def test_fusing_limit_follows_the_fused_path():
    model = _model("resnet")
    seg = AdaptationEngine(model, EngineConfig(method="tent", lr=0.01), num_classes=10)
    vm = AdaptationEngine(model, EngineConfig(method="tent", lr=0.01, segment_norms=False), num_classes=10)
    fixed = AdaptationEngine(model, EngineConfig(method="tent", lr=0.01, fuse_max_images=8), num_classes=10)
    assert seg.segment_fused and not vm.segment_fused and vm.fused
    assert (seg.fuse_max_images, vm.fuse_max_images, fixed.fuse_max_images) == (
        FUSE_MAX_IMAGES["segment"], FUSE_MAX_IMAGES["vmap"], 8)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(FUSE_MAX_IMAGES["segment"], 3, 32, 32, generator=gen) for _ in range(2)]
    seg.step_many([(seg.new_state(), x) for x in xs])
    vm.step_many([(vm.new_state(), x) for x in xs])
    assert seg.fused_forwards["segment"] == 1 and sum(vm.fused_forwards.values()) == 0   # vmap: each alone
