"""Depth-dependent per-image momentum of the per-stream BatchNorm statistics (``bn_momentum_shallow``).

The first BatchNorm layer follows the stream with ``bn_momentum_shallow``, the last with ``bn_momentum``, the layers
in between geometrically interpolated (TTN, Lim et al. 2023). The tests check that shallow and deep layers really
get their own momentum, that 1-image requests work, and that the state stays exact (reset, snapshot/restore,
fingerprint).
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from mgg_core.engine import AdaptationEngine, EngineConfig
from mgg_core.guard import GuardConfig
from mgg_core.normstats import StreamNormStats, batch_momentum, layer_momenta

DEPTH = dict(bn_stats="ema", bn_momentum=0.01, bn_momentum_shallow=0.2, update_images=8)


class _Parallel(nn.Module):
    """Three BatchNorm layers that all see the input itself: each layer's update is checkable in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.BatchNorm2d(3), nn.BatchNorm2d(3), nn.BatchNorm2d(3)
        for bn in (self.a, self.b, self.c):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).eval()


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _engine(method="eata", **cfg):
    config = EngineConfig(method=method, optimizer="sgd" if method != "bn" else None, lr=0.01,
                          guard=cfg.pop("guard", GuardConfig()), **cfg)
    return AdaptationEngine(_resnet(), config, num_classes=10)


def _same(a: dict, b: dict) -> None:
    """Bit-identical tensors (NaN where the other has NaN: the guard's unset signals)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


def _interleaved_equals_alone(eng: AdaptationEngine, xs_a: list, xs_b: list, field: str) -> tuple[list, list]:
    """Two streams (seeds 1 and 2) stepped interleaved on ``xs_a`` / ``xs_b``, then each alone on a fresh state: equal
    logits and ``field`` of every result, bit-identical final tensors. Returns the interleaved results (a's, b's)."""
    a, b = eng.new_state(seed=1), eng.new_state(seed=2)
    ra, rb = [], []
    for xa, xb in zip(xs_a, xs_b, strict=True):
        ra.append(eng.step(a, xa))
        rb.append(eng.step(b, xb))
    for st, xs, res, seed in ((a, xs_a, ra, 1), (b, xs_b, rb, 2)):
        alone = eng.new_state(seed=seed)
        for x, r0 in zip(xs, res, strict=True):
            r = eng.step(alone, x)
            assert torch.equal(r.logits, r0.logits) and getattr(r, field) == getattr(r0, field)
        _same(st.tensors, alone.tensors)
    return ra, rb


def test_layer_momenta_go_from_shallow_to_deep_geometrically():
    m = layer_momenta(5, 0.01, 0.1)
    assert m[0] == pytest.approx(0.1) and m[-1] == pytest.approx(0.01)
    assert m[2] == pytest.approx(math.sqrt(0.1 * 0.01))                 # geometric midpoint
    assert all(a > b for a, b in zip(m, m[1:], strict=False))
    assert layer_momenta(4, 0.05) == [0.05] * 4 and layer_momenta(1, 0.05, 0.3) == [0.05]
    for bad in ((0.0, None), (0.1, 0.0), (0.1, 1.5), (-1.0, 0.1)):
        with pytest.raises(ValueError):
            layer_momenta(3, *bad)


def test_shallow_and_deep_layers_move_with_their_own_momentum():
    torch.manual_seed(1)
    model = _Parallel().eval()
    norm = StreamNormStats(model, "ema", momentum=0.01, shallow_momentum=0.2)
    stats = norm.init_state()
    x = torch.randn(6, 3, 5, 5) * 3 + 1
    with torch.no_grad(), norm.use(stats, x.shape[0]) as updates:
        model(x)
    b_mean = x.mean(dim=(0, 2, 3))
    moved = {}
    for name in ("a", "b", "c"):
        mean0 = stats[f"{name}.mean"]
        moved[name] = (updates[f"{name}.mean"] - mean0) / (b_mean - mean0)   # the request's momentum, per channel
    want = [batch_momentum(m, 6) for m in layer_momenta(3, 0.01, 0.2)]
    for name, w in zip(("a", "b", "c"), want, strict=True):
        assert torch.allclose(moved[name], torch.full((3,), w), rtol=1e-4), name
    # the point of the knob: the first layer follows the stream 20x faster per image than the last
    assert float(moved["a"].mean()) > 5 * float(moved["c"].mean())


def test_engine_first_layer_uses_the_shallow_momentum_and_the_last_the_deep_one():
    x = _images(4)
    batch = _engine("bn", bn_stats="ema", bn_momentum=1.0)      # momentum 1: the statistics become the batch's
    depth = _engine("bn", bn_stats="ema", bn_momentum=0.01, bn_momentum_shallow=0.2)
    sb, sd, src = batch.new_state(), depth.new_state(), depth.new_state()
    batch.step(sb, x)
    depth.step(sd, x)
    names = list(depth.norm.layers)
    first = f"norm.{names[0]}.mean"                              # its input does not depend on any statistics
    frac = (sd.tensors[first] - src.tensors[first]) / (sb.tensors[first] - src.tensors[first])
    assert torch.allclose(frac, torch.full_like(frac, batch_momentum(0.2, 4)), rtol=1e-3)
    assert depth.norm.momenta[names[0]] == pytest.approx(0.2) and depth.norm.momenta[names[-1]] == pytest.approx(0.01)
    uniform = _engine("bn", bn_stats="ema", bn_momentum=0.01)
    assert set(uniform.norm.momenta.values()) == {0.01}
    su = uniform.new_state()
    uniform.step(su, x)
    assert not torch.equal(su.tensors[first], sd.tensors[first])


@pytest.mark.parametrize("method", ["bn", "tent", "eata", "foa"])
def test_one_image_requests_work_with_depth_momentum(method):
    kw = {} if method != "foa" else {"update_images": 4}
    eng = _engine(method, guard=GuardConfig(enabled=True, check_share=1.0), **{**DEPTH, **kw}) if method != "foa" \
        else None
    if eng is None:       # FOA needs source feature statistics; the ResNet's are computed from noise here
        from mgg_core.features import compute_source_stats
        probe = AdaptationEngine(_resnet(), EngineConfig(method="noadapt"), num_classes=10)
        stats = compute_source_stats(probe.source_features, [_images(16, 99), _images(16, 98)])
        eng = AdaptationEngine(_resnet(), EngineConfig(method="foa", optimizer="sgd", lr=0.01, **{**DEPTH, **kw}),
                               num_classes=10, source_stats=stats)
    st, fresh = eng.new_state(), eng.new_state()
    for i in range(5):
        r = eng.step(st, _images(1, i))
        assert r.logits.shape == (1, 10) and torch.isfinite(r.logits).all()
    k = f"norm.{next(iter(eng.norm.layers))}.mean"
    if method == "eata":      # a random model's near-uniform predictions fail EATA's entropy filter: no step commits
        return
    assert not torch.equal(st.tensors[k], fresh.tensors[k])     # the 1-image requests moved the statistics


def _restore_and_continue(eng: AdaptationEngine, st, tmp_path) -> None:
    """Save ``st``, restore it, run the same 1-, 4- and 1-image requests on both: identical logits and states."""
    st.save(tmp_path / "s.safetensors")
    restored = eng.load_state(tmp_path / "s.safetensors")
    a = [eng.step(st, _images(n, 50 + i)).logits for i, n in enumerate([1, 4, 1])]
    b = [eng.step(restored, _images(n, 50 + i)).logits for i, n in enumerate([1, 4, 1])]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    _same(st.tensors, restored.tensors)


def test_depth_momentum_state_resets_snapshots_and_is_fingerprinted(tmp_path):
    eng = _engine("eata", guard=GuardConfig(enabled=True, warmup_images=2, warmup_checks=1), **DEPTH)
    fresh = eng.new_state(seed=3)
    st = eng.new_state(seed=3)
    for i, n in enumerate([1, 2, 1, 3]):
        eng.step(st, _images(n, 10 + i))
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["bn_momentum_shallow"] == 0.2
    uniform = _engine("eata", **{**DEPTH, "bn_momentum_shallow": None})
    assert "bn_momentum_shallow" not in uniform.fingerprint        # uniform engines keep the older fingerprint
    other = _engine("eata", **{**DEPTH, "bn_momentum_shallow": 0.1})
    with pytest.raises(Exception, match="bn_momentum_shallow"):
        other.load_state(tmp_path / "s.safetensors")


def test_requests_the_method_filters_out_still_move_the_statistics():
    """EATA with an entropy margin no image passes skips every step (no reliable samples); the images were seen,
    so the statistics move exactly as under the gradient-free ``bn`` method (else 1-image requests, filtered one
    by one, would build the statistics from a selected subset that 64-image requests do not)."""
    from mgg_core.reasons import SkipReason

    filtered = AdaptationEngine(_resnet(), EngineConfig(method="eata", optimizer="sgd", lr=0.01,
                                                        method_kwargs={"e_margin": 0.0}, **DEPTH), num_classes=10)
    plain = _engine("bn", **{k: v for k, v in DEPTH.items() if k != "update_images"})
    a, b, fresh = filtered.new_state(), plain.new_state(), plain.new_state()
    for i in range(4):
        r = filtered.step(a, _images(1, i))
        assert r.skipped_reason == SkipReason.NO_RELIABLE_SAMPLES and not r.adapted
        plain.step(b, _images(1, i))
    norm = [k for k in fresh.tensors if k.startswith("norm.")]
    assert norm and all(torch.equal(a.tensors[k], b.tensors[k]) for k in norm)
    assert not torch.equal(a.tensors[norm[0]], fresh.tensors[norm[0]])
    assert torch.equal(a.theta, filtered.new_state().theta)


def test_bn_momentum_shallow_is_a_validated_service_setting_that_reaches_the_engine(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValidationError, match="bn_momentum_shallow"):
            ServiceSettings(_env_file=None, bn_momentum_shallow=bad)
    monkeypatch.setenv(f"{ENV_PREFIX}BN_MOMENTUM_SHALLOW", "0.3")
    settings = ServiceSettings(_env_file=None, bn_momentum=0.004)
    cfg = engine_config(settings, build_method("eata", 10), "cpu", None)
    assert cfg.bn_momentum_shallow == 0.3 and cfg.bn_momentum == 0.004
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    names = list(eng.norm.layers)
    assert eng.norm.momenta[names[0]] == pytest.approx(0.3) and eng.norm.momenta[names[-1]] == pytest.approx(0.004)
