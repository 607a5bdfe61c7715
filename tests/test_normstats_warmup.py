"""Statistics warm-up of the per-stream BatchNorm statistics (``bn_prior_images``, normstats.warm_momentum).

Image t since the stream's statistics were the source's merges with momentum ``max(m, 1/(N0 + t + 1))``: a
cumulative mean of the source (worth N0 images) and the stream's images, until the layer's own momentum takes
over. The tests check the closed form against the per-image product, the cumulative mean through the hooks, that
request sizes do not matter, and that the count is exact stream state (reset, fallback, snapshot, fingerprint).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_normstats_depth import _engine, _images, _resnet, _restore_and_continue, _same
from torch import nn

from mgg_core.engine import WARMUP_SLOW_IMAGES, AdaptationEngine
from mgg_core.guard import GuardConfig, image_descriptor
from mgg_core.normstats import StreamNormStats, batch_momentum, warm_momentum

WARM = dict(bn_stats="ema", bn_momentum=0.001, bn_momentum_shallow=0.2, bn_prior_images=16, update_images=8)


def _per_image(m: float, n: int, t: int, n0: float) -> float:
    keep = 1.0
    for j in range(t, t + n):
        keep *= 1.0 - max(m, 1.0 / (n0 + j + 1))
    return 1.0 - keep


@pytest.mark.parametrize("m,n0", [(0.001, 16), (0.2, 16), (0.2, 2), (0.01, 50), (0.05, 0.5)])
def test_closed_form_is_the_product_of_the_per_image_momenta(m, n0):
    for t in (0, 1, 7, 19, 99, 998, 5000):
        for n in (1, 3, 4, 64, 300):
            want = _per_image(m, n, t, n0)
            assert warm_momentum(m, n, t, n0) == pytest.approx(want, abs=1e-12)
            rows = warm_momentum(m, n, torch.tensor([float(t), float(t + 1)], dtype=torch.float64), n0)
            assert float(rows[0]) == pytest.approx(want, abs=1e-12)          # one count per stream
            assert float(rows[1]) == pytest.approx(_per_image(m, n, t + 1, n0), abs=1e-12)
    # long after the warm-up it is the plain momentum; at the start a request of n weighs n / (N0 + n)
    assert warm_momentum(m, 4, 10**7, n0) == pytest.approx(batch_momentum(m, 4), rel=1e-12)
    if 1.0 / (n0 + 4) > m:
        assert warm_momentum(m, 4, 0, n0) == pytest.approx(4 / (n0 + 4))


def test_warm_up_is_a_cumulative_mean_of_source_and_images_and_ignores_request_sizes():
    torch.manual_seed(2)
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    model = nn.Sequential(bn)
    norm = StreamNormStats(model, "ema", momentum=1e-4, prior_images=10)
    xs = [torch.randn(1, 3, 4, 4) * 2 + i for i in range(12)]

    def run(chunks):
        stats = norm.init_state()
        for c in chunks:
            with torch.no_grad(), norm.use(stats, c.shape[0]) as upd:
                model(c)
            stats = {**stats, **upd}
        return stats

    one = run(xs)
    four = run([torch.cat(xs[i:i + 4]) for i in range(0, 12, 4)])
    src = norm.source["0"][0]
    want = (10 * src + sum(x.mean((0, 2, 3)) for x in xs)) / (10 + 12)      # the cumulative mean
    assert torch.allclose(one["0.mean"], want, atol=1e-5)
    assert torch.allclose(four["0.mean"], want, atol=1e-5)
    assert float(one["seen"]) == float(four["seen"]) == 12.0
    plain = StreamNormStats(nn.Sequential(bn), "ema", momentum=1e-4)
    assert "seen" not in plain.init_state()           # without the warm-up the state keeps its older layout
    for bad in (0.0, -3.0):
        with pytest.raises(ValueError, match="bn_prior_images"):
            StreamNormStats(nn.Sequential(nn.BatchNorm2d(3)), "ema", prior_images=bad)


def test_engine_deep_layer_follows_the_first_request_like_a_cumulative_mean():
    x = _images(4)
    warm, plain = _engine("bn", **{**WARM, "update_images": 1}), _engine("bn", **{
        **WARM, "update_images": 1, "bn_prior_images": None})
    names = list(warm.norm.layers)
    assert warm.norm.momenta[names[-1]] == pytest.approx(0.001)
    sw, sp, src = warm.new_state(), plain.new_state(), warm.new_state()
    warm.step(sw, x)
    plain.step(sp, x)
    assert float(sw.tensors["norm.seen"]) == 4.0
    last = f"norm.{names[-1]}.var"
    moved_w = (sw.tensors[last] - src.tensors[last]).abs().mean()
    moved_p = (sp.tensors[last] - src.tensors[last]).abs().mean()
    # the deepest layer moves about (4/20) / (1 - 0.999^4) = 50x more in the warm-up
    assert float(moved_w) > 20 * float(moved_p)


def test_warm_up_count_resets_restarts_on_fallback_snapshots_and_is_fingerprinted(tmp_path):
    # a random model's near-uniform predictions would trip the entropy fallback (which restarts the count)
    eng = _engine("eata", guard=GuardConfig(enabled=True, warmup_images=2, warmup_checks=1, max_entropy=1.01,
                                            max_class_share=1.01), **WARM)
    fresh, st = eng.new_state(seed=3), eng.new_state(seed=3)
    assert "norm.seen" in fresh.tensors and fresh.tensors["norm.seen"].dtype == torch.float64
    plain = _engine("eata", **{**WARM, "bn_prior_images": None})
    assert st.nbytes() == plain.new_state().nbytes() + 8          # the count is counted in the state's bytes
    for i, n in enumerate([1, 2, 1, 3]):
        eng.step(st, _images(n, 10 + i))
    assert float(st.tensors["norm.seen"]) == 7.0 and st.rollbacks == 0
    _restore_and_continue(eng, st, tmp_path)
    assert float(st.tensors["norm.seen"]) == 13.0
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["bn_prior_images"] == 16.0 and "bn_prior_images" not in plain.fingerprint
    with pytest.raises(Exception, match="bn_prior_images"):
        plain.load_state(tmp_path / "s.safetensors")
    other = _engine("eata", **{**WARM, "bn_prior_images": 32})
    with pytest.raises(Exception, match="bn_prior_images"):
        other.load_state(tmp_path / "s.safetensors")


def test_a_guard_fallback_to_source_restarts_the_count_and_a_hold_pauses_it():
    from mgg_core.engine import StepResult
    from mgg_core.reasons import RollbackReason

    eng = _engine("eata", guard=GuardConfig(enabled=True, hold_images=8, max_entropy=1.01, max_class_share=1.01),
                  **WARM)
    st = eng.new_state()
    for i in range(3):
        eng.step(st, _images(4, i))
    assert float(st.tensors["norm.seen"]) == 12.0
    res = StepResult(logits=torch.zeros(1, 10), adapted=False, skipped_reason=None, loss=None, batch_entropy=0.0,
                     sample_entropy=torch.zeros(1), n_selected=0, step=0)
    eng._fall_back(st, RollbackReason.SOURCE_DISAGREEMENT, res)
    assert float(st.tensors["norm.seen"]) == 0.0 and float(st.tensors["guard.hold"]) == 8.0
    eng.step(st, _images(4, 7))                                      # held at source: the count does not move
    assert float(st.tensors["norm.seen"]) == 0.0


def test_bn_prior_images_is_a_validated_service_setting_that_reaches_the_engine(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    for bad in (0.0, -1.0, 2_000_000.0):
        with pytest.raises(ValidationError, match="bn_prior_images"):
            ServiceSettings(_env_file=None, bn_prior_images=bad)
    assert ServiceSettings(_env_file=None, bn_prior_images=1_000_000.0).bn_prior_images == 1_000_000.0
    monkeypatch.setenv(f"{ENV_PREFIX}BN_PRIOR_IMAGES", "24")
    cfg = engine_config(ServiceSettings(_env_file=None), build_method("eata", 10), "cpu", None)
    assert cfg.bn_prior_images == 24.0
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.norm.prior_images == 24.0 and eng.describe()["bn_prior_images"] == 24.0


SHIFT = {**WARM, "bn_warmup_shift": 3.0}


def _domain(n: int, seed: int, scale: float, offset: float) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * scale + offset


def test_warm_up_on_shift_starts_over_only_when_the_domain_changes():
    """With ``bn_warmup_shift`` a stream starts with the warm-up over; requests of one domain leave it over; a
    request from a clearly different domain (pixel statistics) restarts it, and the next images then merge at the
    warm-up's momentum."""
    eng = _engine("bn", **{**SHIFT, "update_images": 1})
    st = eng.new_state()
    done = eng.norm.warm_done
    assert float(st.tensors["norm.seen"]) == done and done == 1000.0
    for i in range(12):                                   # one domain: no restart
        eng.step(st, _domain(4, i, 1.0, 0.0))
    assert float(st.tensors["norm.seen"]) == done + 48
    for i in range(3):                                    # another domain: contrast x0.1, brighter
        eng.step(st, _domain(4, 100 + i, 0.1, 2.0))
    seen = float(st.tensors["norm.seen"])
    assert seen < 12, seen                                # restarted within the new domain's first requests
    off = _engine("bn", **{**SHIFT, "update_images": 1, "bn_warmup_shift": None, "bn_prior_images": None})
    assert "warm.slow" not in off.new_state().tensors and "bn_warmup_shift" not in off.fingerprint
    with pytest.raises(ValueError, match="bn_warmup_shift"):
        _engine("bn", **{**SHIFT, "bn_prior_images": None})


def test_warm_up_on_shift_state_resets_survives_fallback_restores_and_is_fingerprinted(tmp_path):
    from mgg_core.engine import StepResult
    from mgg_core.reasons import RollbackReason

    eng = _engine("eata", guard=GuardConfig(enabled=True, warmup_images=2, warmup_checks=1, max_entropy=1.01,
                                            max_class_share=1.01, hold_images=8), **SHIFT)
    fresh, st = eng.new_state(seed=1), eng.new_state(seed=1)
    assert torch.isnan(fresh.tensors["warm.slow"]).all()
    assert st.nbytes() == _engine("eata", **WARM).new_state().nbytes() + 2 * 4 * 8
    for i, (n, scale) in enumerate([(4, 1.0), (2, 1.0), (4, 0.1), (1, 0.1)]):
        eng.step(st, _domain(n, 10 + i, scale, 0.5))
    st.save(tmp_path / "s.safetensors")
    restored = eng.load_state(tmp_path / "s.safetensors")
    for i, n in enumerate([1, 4, 2]):
        a, b = eng.step(st, _domain(n, 50 + i, 1.0, 0.0)), eng.step(restored, _domain(n, 50 + i, 1.0, 0.0))
        assert torch.equal(a.logits, b.logits)
    _same(st.tensors, restored.tensors)
    slow = st.tensors["warm.slow"].clone()
    res = StepResult(logits=torch.zeros(1, 10), adapted=False, skipped_reason=None, loss=None, batch_entropy=0.0,
                     sample_entropy=torch.zeros(1), n_selected=0, step=0)
    eng._fall_back(st, RollbackReason.SOURCE_DISAGREEMENT, res)
    assert torch.equal(st.tensors["warm.slow"], slow)                 # the reference follows the data: kept
    assert float(st.tensors["norm.seen"]) == eng.norm.warm_done        # back at source: warm-up over
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["bn_warmup_shift"] == 3.0
    with pytest.raises(Exception, match="bn_warmup_shift"):
        _engine("eata", **WARM).load_state(tmp_path / "s.safetensors")


def test_bn_warmup_shift_is_a_validated_service_setting_that_reaches_the_engine(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    for bad in (0.0, -1.0, 1001.0):
        with pytest.raises(ValidationError, match="bn_warmup_shift"):
            ServiceSettings(_env_file=None, bn_prior_images=8, bn_warmup_shift=bad)
    with pytest.raises(ValidationError, match="bn_warmup_shift needs bn_prior_images"):   # at start-up, not later
        ServiceSettings(_env_file=None, bn_prior_images=None, bn_warmup_shift=3.0)
    monkeypatch.setenv(f"{ENV_PREFIX}BN_WARMUP_SHIFT", "1000")
    cfg = engine_config(ServiceSettings(_env_file=None, bn_prior_images=8), build_method("eata", 10), "cpu", None)
    assert cfg.bn_warmup_shift == 1000.0
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.warmup_shift == 1000.0 and not eng.norm.warm_start


RELEASE = {**WARM, "bn_warmup_release": True}


def _held(eng: AdaptationEngine, st) -> None:
    """Force a fallback to a hold at source (a reason of HOLD_REASONS), as the guard's judge would."""
    from mgg_core.engine import StepResult
    from mgg_core.reasons import RollbackReason

    res = StepResult(logits=torch.zeros(1, 10), adapted=False, skipped_reason=None, loss=None, batch_entropy=0.0,
                     sample_entropy=torch.zeros(1), n_selected=0, step=0)
    eng._fall_back(st, RollbackReason.SOURCE_DISAGREEMENT, res)
    assert float(st.tensors["guard.hold"]) > 0


@pytest.mark.parametrize("on_shift", [None, 3.0])
def test_warm_up_release_restarts_when_a_hold_ends_for_a_domain_shift(on_shift):
    """``bn_warmup_release``: a stream starts with the warm-up over, a fallback leaves it over; when the hold ends
    because the data moved to another domain (``hold_released == domain_shift``) the count restarts at 0, and the
    next images merge at the warm-up's momentum. Without the setting the same stream keeps it over; with
    ``bn_warmup_shift`` the slow descriptor reference restarts at the guard's fast EMA."""
    guard = GuardConfig(enabled=True, warmup_images=10**6, warmup_checks=10**6, hold_images=1000,
                        shift_threshold=6.0)
    counts = {}
    for release in (False, True):
        # the control: the warm-up over at the start too (a shift threshold that never fires), no release restart
        eng = _engine("eata", guard=guard, **{**RELEASE, "bn_warmup_release": release,
                                              "bn_warmup_shift": on_shift if release else 1000.0})
        st = eng.new_state(seed=4)
        done = eng.norm.warm_done
        assert float(st.tensors["norm.seen"]) == done
        for i in range(4):
            eng.step(st, _domain(4, i, 1.0, 0.0))
        _held(eng, st)
        assert float(st.tensors["norm.seen"]) == done                 # back at source: warm-up over
        released = []
        for i in range(12):                                            # 32 reference images of the held domain
            released.append(eng.step(st, _domain(4, 20 + i, 1.0, 0.0)).hold_released)
        assert not any(released)
        for i in range(6):                                             # another domain ends the hold
            x = _domain(4, 100 + i, 0.1, 2.0)
            r = eng.step(st, x)
            if r.hold_released is not None:
                assert r.hold_released.value == "domain_shift"
                seen_at = float(st.tensors["norm.seen"])
                break
        else:
            raise AssertionError("the hold did not end on the domain shift")
        counts[release] = seen_at
        if release and on_shift is not None:   # the reference restarted at the fast EMA, then took the request in
            keep = (1.0 - 1.0 / WARMUP_SLOW_IMAGES) ** x.shape[0]
            want = keep * st.tensors["guard.shift_fast"].double() + (1 - keep) * image_descriptor(x).double().mean(0)
            torch.testing.assert_close(st.tensors["warm.slow"], want)
    assert counts[False] == eng.norm.warm_done
    assert counts[True] == 0.0 and eng.fingerprint["bn_warmup_release"] is True


def test_warm_up_release_state_resets_restores_and_is_fingerprinted(tmp_path):
    guard = GuardConfig(enabled=True, warmup_images=10**6, warmup_checks=10**6, hold_images=1000,
                        shift_threshold=6.0)
    eng = _engine("eata", guard=guard, **RELEASE)
    fresh, st = eng.new_state(seed=1), eng.new_state(seed=1)
    assert st.nbytes() == _engine("eata", guard=guard, **WARM).new_state().nbytes()   # no new tensor: norm.seen
    eng.step(st, _domain(4, 1, 1.0, 0.0))
    _held(eng, st)
    for i in range(9):
        eng.step(st, _domain(4, 20 + i, 1.0, 0.0))
    for i in range(3):
        eng.step(st, _domain(4, 100 + i, 0.1, 2.0))
    assert float(st.tensors["norm.seen"]) < eng.norm.warm_done        # restarted by the release
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    with pytest.raises(Exception, match="bn_warmup_release"):
        _engine("eata", guard=guard, **WARM).load_state(tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match="bn_warmup_release needs bn_prior_images"):
        _engine("eata", **{**RELEASE, "bn_prior_images": None})


def test_bn_warmup_release_is_a_validated_service_setting_that_reaches_the_engine(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    default = ServiceSettings(_env_file=None)
    assert default.bn_warmup_release is True and default.bn_prior_images == 16.0      # session 6's held-out choice
    with pytest.raises(ValidationError, match="bn_warmup_release needs bn_prior_images"):   # at start-up
        ServiceSettings(_env_file=None, bn_prior_images=None, bn_warmup_release=True)
    no_warmup = ServiceSettings(_env_file=None, bn_prior_images=None)   # the warm-up off, its release with it
    cfg = engine_config(no_warmup, build_method("eata", 10), "cpu", None)
    assert cfg.bn_prior_images is None and cfg.bn_warmup_release is False
    AdaptationEngine(_resnet(), cfg, num_classes=10)
    monkeypatch.setenv(f"{ENV_PREFIX}BN_WARMUP_RELEASE", "true")
    cfg = engine_config(ServiceSettings(_env_file=None, bn_prior_images=8), build_method("eata", 10), "cpu", None)
    assert cfg.bn_warmup_release is True
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.warmup_release and not eng.norm.warm_start and eng.describe()["bn_warmup_release"] is True


def test_describe_gives_the_statistics_settings_only_where_they_act():
    # the service defaults (bn_prior_images, bn_warmup_release, ...) on a model without per-stream BatchNorm
    # statistics do nothing: /info must not claim them. A LayerNorm model, and the BatchNorm ResNet with 'batch'
    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ServiceSettings

    cfg = engine_config(ServiceSettings(_env_file=None), build_method("eata", 10), "cpu", None)
    assert cfg.bn_prior_images and cfg.bn_warmup_release
    ln = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LayerNorm(8 * 30 * 30), nn.Linear(8 * 30 * 30, 10))
    stats_keys = ("bn_momentum", "bn_momentum_shallow", "bn_prior_images", "bn_warmup_shift", "bn_warmup_release")
    for model, bn_stats in ((ln, None), (_resnet(), "batch"), (_resnet(), "source")):
        eng = AdaptationEngine(model, replace(cfg, bn_stats=bn_stats), num_classes=10)
        assert not eng.norm.per_stream
        assert {k: eng.describe()[k] for k in stats_keys} == dict.fromkeys(stats_keys), bn_stats
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    d = eng.describe()
    assert d["bn_prior_images"] == cfg.bn_prior_images and d["bn_warmup_release"] is True
    assert d["bn_momentum"] == cfg.bn_momentum and d["bn_warmup_shift"] is None
