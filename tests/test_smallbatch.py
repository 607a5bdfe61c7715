"""Small requests: 1-image batches everywhere, per-stream BatchNorm statistics and update windows, the guard.

Per-stream state added for small batches (``norm.*`` EMA statistics, ``accum.*`` gradient window, ``window.*``
feature window, ``guard.*`` signals) must reset exactly, survive snapshot -> restore -> continue bit-identically,
and keep streams independent.
"""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from mgg_core.engine import AdaptationEngine, EngineConfig
from mgg_core.features import compute_source_stats
from mgg_core.guard import Fallback, GuardConfig, guard_init_state, image_descriptor, judge, observe, shift_score
from mgg_core.mgg import GradientMemoryLayer
from mgg_core.normstats import batch_momentum
from mgg_core.optim import MGG
from mgg_core.reasons import HoldRelease

METHOD_OPTIMIZERS = [(m, o) for m in ("tent", "eata", "sar", "deyo", "foa") for o in ("sgd", "adam", "mgg")]
SMALL = dict(bn_stats="ema", bn_momentum=0.1, update_images=8)   # small-batch design, small window for tests


def _group_norm(num_channels, **kwargs):
    return nn.GroupNorm(8, num_channels)


def _models():
    torch.manual_seed(0)
    return {
        "resnet": lambda: timm.create_model("test_resnet", num_classes=10).eval(),
        "vit": lambda: timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4).eval(),
        "groupnorm": lambda: timm.create_model("test_resnet", num_classes=10, norm_layer=_group_norm).eval(),
    }


def _images(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _engine(model, method="tent", optimizer="sgd", lr=0.01, guard=None, **cfg):
    stats = None
    if method == "foa":
        probe = AdaptationEngine(model, EngineConfig(method="noadapt"), num_classes=10)
        stats = compute_source_stats(probe.source_features, [_images(16, 99), _images(16, 98)])
    opt = MGG(GradientMemoryLayer(seed=0), lr=lr) if optimizer == "mgg" else None
    config = EngineConfig(method=method, optimizer=None if optimizer == "mgg" else optimizer, lr=lr,
                          guard=guard or GuardConfig(), **cfg)
    return AdaptationEngine(model, config, num_classes=10, source_stats=stats, optimizer=opt)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) or (torch.isnan(a[k]).all() and torch.isnan(b[k]).all())
                                        for k in a)


# ------------------------------------------------------------------------------- 1 image is a valid batch
@pytest.mark.parametrize("model_name", ["resnet", "vit", "groupnorm"])
@pytest.mark.parametrize("design", ["default", "small"])
def test_one_image_batches_for_every_method_and_optimizer(model_name, design):
    model = _models()[model_name]()
    extra = {**SMALL, "update_images": 4} if design == "small" else {}
    for method in ("noadapt", "bn"):
        eng = _engine(model, method, None, **extra)
        st = eng.new_state()
        for i in range(3):
            r = eng.step(st, _images(1, i))
            assert r.logits.shape == (1, 10) and torch.isfinite(r.logits).all()
    for method, optimizer in METHOD_OPTIMIZERS:
        # guard on (its source checks run on every request), judging only after its warm-up: a random model's
        # near-uniform predictions would otherwise be rolled back at once
        eng = _engine(model, method, optimizer, guard=GuardConfig(enabled=True, check_share=1.0), **extra)
        st = eng.new_state()
        for i in range(5):
            r = eng.step(st, _images(1, i))
            assert r.logits.shape == (1, 10) and torch.isfinite(r.logits).all(), (method, optimizer)
        assert torch.isfinite(st.theta).all()
        if design == "small" and method in ("tent", "foa"):   # every image counts towards the window
            assert st.step >= 1 and st.batches == 5


def test_one_image_batchnorm_layer_at_1x1_uses_statistics_not_an_error():
    model = _models()["resnet"]()
    x = _images(1)
    with pytest.raises(ValueError):      # plain torch in training mode refuses one value per channel
        m = timm.create_model("test_resnet", num_classes=10)
        m.load_state_dict(model.state_dict())
        m.train()(x)
    for bn_stats in ("batch", "ema", "source"):
        eng = _engine(model, "tent", "sgd", bn_stats=bn_stats)
        assert torch.isfinite(eng.step(eng.new_state(), x).logits).all()


# ------------------------------------------------------------------------------- EMA statistics
def test_ema_statistics_merge_like_populations_and_do_not_depend_on_request_size():
    assert batch_momentum(0.1, 1) == pytest.approx(0.1)
    assert batch_momentum(0.1, 2) == pytest.approx(1 - 0.81)
    model = _models()["resnet"]()
    eng = _engine(model, "bn", None, bn_stats="ema", bn_momentum=1.0)    # momentum 1: exactly the batch's
    x = _images(16) * 2 + 0.5
    st = eng.new_state()
    eng.step(st, x)
    ref = timm.create_model("test_resnet", num_classes=10)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        want = ref.train()(x)
    assert torch.allclose(eng.predict(eng.new_state(), x), model(x), atol=1e-5)   # fresh stream = source
    small = _engine(model, "bn", None, bn_stats="ema", bn_momentum=1.0)
    s2 = small.new_state()
    got = small.step(s2, x).logits
    assert torch.allclose(got, want, atol=1e-4)
    # one 4-image request moves the statistics like four 1-image requests (to first order in the momentum):
    # compare the first layer's means
    eng = _engine(model, "bn", None, bn_stats="ema", bn_momentum=0.05)
    a, b = eng.new_state(), eng.new_state()
    eng.step(a, x[:4])
    for i in range(4):
        eng.step(b, x[i:i + 1])
    k = next(k for k in a.tensors if k.startswith("norm.") and k.endswith(".mean"))
    src = eng.new_state().tensors[k]
    da, db = a.tensors[k] - src, b.tensors[k] - src
    assert torch.allclose(da, db, rtol=0.05, atol=0.05 * float(da.abs().max()))


# ------------------------------------------------------------------------------- per-stream state
def _stream(eng, st, sizes, seed):
    outs = []
    for i, n in enumerate(sizes):
        outs.append(eng.step(st, _images(n, seed * 100 + i)).logits)
    return outs


@pytest.mark.parametrize("model_name,method,optimizer", [("resnet", "tent", "sgd"), ("resnet", "foa", "mgg"),
                                                         ("vit", "foa", "mgg"), ("vit", "tent", "adam")])
def test_small_batch_state_resets_exactly(model_name, method, optimizer):
    eng = _engine(_models()[model_name](), method, optimizer, guard=GuardConfig(enabled=True), **SMALL)
    fresh = eng.new_state()
    keys = set(fresh.tensors)
    assert {"accum.grad", "accum.images"} <= keys and any(k.startswith("guard.") for k in keys)
    if model_name == "resnet":
        assert any(k.startswith("norm.") for k in keys)
    if method == "foa":
        assert {"window.features", "window.count"} <= keys
    st = eng.new_state()
    _stream(eng, st, [1, 3, 1, 2, 5, 1], seed=1)
    assert int(st.tensors["accum.images"]) > 0 or st.step > 0
    assert not _same(st.tensors, fresh.tensors)
    eng.reset(st)
    assert _same(st.tensors, fresh.tensors) and st.images == 0 and st.batches == 0


@pytest.mark.parametrize("model_name,method,optimizer", [("resnet", "foa", "mgg"), ("vit", "foa", "mgg"),
                                                         ("groupnorm", "sar", "sgd"), ("resnet", "deyo", "adam")])
def test_small_batch_snapshot_restore_continue_is_bit_identical(tmp_path, model_name, method, optimizer):
    eng = _engine(_models()[model_name](), method, optimizer,
                  guard=GuardConfig(enabled=True, warmup_images=2, warmup_checks=1, anchor_every_images=4), **SMALL)
    st = eng.new_state(seed=3)
    _stream(eng, st, [1, 2, 1, 3], seed=2)           # 7 images: a window is pending (update_images=8)
    size = st.save(tmp_path / "s.safetensors")
    assert size >= st.nbytes()
    restored = eng.load_state(tmp_path / "s.safetensors")
    assert _same(restored.tensors, st.tensors)
    a = _stream(eng, st, [1, 1, 4, 2, 1], seed=5)
    b = _stream(eng, restored, [1, 1, 4, 2, 1], seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert _same(restored.tensors, st.tensors) and restored.step == st.step


def test_small_batch_state_is_counted_and_fingerprinted():
    eng = _engine(_models()["resnet"](), "foa", "mgg", **SMALL)
    st = eng.new_state()
    extra = sum(v.numel() * v.element_size() for k, v in st.tensors.items()
                if k.split(".")[0] in ("norm", "accum", "window", "guard"))
    assert extra > 0 and st.nbytes() == sum(v.numel() * v.element_size() for v in st.tensors.values())
    assert eng.fingerprint["update_images"] == 8 and eng.fingerprint["bn_stats"] == "ema"
    assert eng.fingerprint["bn_momentum"] == 0.1 and eng.fingerprint["feature_window"] == 7
    other = _engine(_models()["resnet"](), "foa", "mgg", **{**SMALL, "update_images": 16})
    assert other.fingerprint != eng.fingerprint


@pytest.mark.parametrize("model_name,method,optimizer", [("resnet", "foa", "mgg"), ("vit", "tent", "sgd")])
def test_interleaved_small_batch_streams_equal_streams_run_alone(model_name, method, optimizer):
    eng = _engine(_models()[model_name](), method, optimizer, guard=GuardConfig(enabled=True, warmup_images=2,
                                                                                  warmup_checks=1), **SMALL)
    sizes_a, sizes_b = [1, 2, 1, 1, 4, 1, 3], [3, 1, 1, 2, 1, 1, 5]
    alone_a = _stream(eng, eng.new_state(seed=1), sizes_a, seed=10)
    alone_b = _stream(eng, eng.new_state(seed=2), sizes_b, seed=20)
    sa, sb = eng.new_state(seed=1), eng.new_state(seed=2)
    for i, (na, nb) in enumerate(zip(sizes_a, sizes_b, strict=True)):
        assert torch.equal(eng.step(sa, _images(na, 1000 + i)).logits, alone_a[i])
        assert torch.equal(eng.step(sb, _images(nb, 2000 + i)).logits, alone_b[i])


def test_gradient_window_updates_once_enough_images_were_seen():
    eng = _engine(_models()["vit"](), "tent", "sgd", update_images=4)
    st = eng.new_state()
    results = [eng.step(st, _images(1, i)) for i in range(4)]
    assert [r.adapted for r in results] == [False, False, False, True]
    assert [r.skipped_reason for r in results[:3]] == ["accumulating"] * 3
    assert st.step == 1 and int(st.tensors["accum.images"]) == 0
    # one update from four 1-image requests equals one update from the same four images in one request
    # (TENT's loss is a mean over images; LayerNorm couples nothing across images)
    one = eng.new_state()
    eng.step(one, torch.cat([_images(1, i) for i in range(4)]))
    assert torch.allclose(one.theta, st.theta, atol=1e-6)


# ------------------------------------------------------------------------------- guard
def _signals(cfg, adapted_logits, source_logits, repeats=40):
    g = guard_init_state(10, "cpu")
    for _ in range(repeats):
        g = observe(cfg, g, adapted_logits, source_logits)
    return g


def _onehot(labels, scale=8.0):
    return torch.nn.functional.one_hot(torch.as_tensor(labels), 10).float() * scale


def test_guard_tells_label_shift_from_partial_collapse():
    cfg = GuardConfig(enabled=True, warmup_images=0, warmup_checks=1)
    shifted = [3] * 13 + [1, 2, 4]                                     # a camera seeing mostly one class
    assert judge(cfg, _signals(cfg, _onehot(shifted), _onehot(shifted)), 10_000) is None
    source = list(range(10)) + [0, 1, 2, 3, 4, 5]
    partial = [7] * 10 + [0, 1, 2, 3, 4, 5]                           # 62% one class, the source says 12%
    assert judge(cfg, _signals(cfg, _onehot(partial), _onehot(source)), 10_000) == Fallback.PARTIAL_COLLAPSE
    diverse_but_wrong = [(s + 1) % 10 for s in source]                 # overturns the source's confident answers
    assert judge(cfg, _signals(cfg, _onehot(diverse_but_wrong), _onehot(source)), 10_000) == \
        Fallback.SOURCE_DISAGREEMENT
    unsure = _onehot(source, scale=2.0)                                # less certain than the source
    assert judge(cfg, _signals(cfg, unsure, _onehot(source)), 10_000) == Fallback.LESS_CERTAIN_THAN_SOURCE
    warm = dataclasses.replace(cfg, warmup_images=100)
    assert judge(warm, _signals(cfg, _onehot(partial), _onehot(source)), 10) is None   # warm-up
    # a source that predicts one class for everything (common under strong corruption) is no reference
    collapsed_source = _onehot([0] * 16)
    assert judge(cfg, _signals(cfg, _onehot(diverse_but_wrong), collapsed_source), 10_000) is None
    assert str(Fallback.PARTIAL_COLLAPSE) == "partial_collapse"


def test_guard_signals_do_not_depend_on_request_size():
    cfg = GuardConfig(enabled=True, check_share=1.0)
    logits = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    src = logits + 0.3
    one = guard_init_state(10, "cpu")
    for i in range(16):
        one = observe(cfg, one, logits[i:i + 1], src[i:i + 1])
    sixteen = observe(cfg, guard_init_state(10, "cpu"), logits, src)
    # EMAs over images, not requests: the same images weigh (nearly) the same (order effects only)
    assert abs(float(one["entropy_ema"]) - float(sixteen["entropy_ema"])) < 0.05
    assert float(one["checked"]) == float(sixteen["checked"]) == 16


def test_guard_falls_back_when_adaptation_hurts_and_counts_it():
    import numpy as np

    from mgg_core.classifier import default_checkpoint, load_classifier
    from mgg_core.data.sources import mnist5k

    clf = load_classifier(default_checkpoint("resnet"))
    src = mnist5k("test")
    order = np.random.default_rng(0).permutation(len(src))[:256]
    x = clf.preprocessor(np.stack([src.get_image(int(i)) for i in order]))
    guard = GuardConfig(enabled=True, warmup_images=32, warmup_checks=16, horizon_images=32)
    eng = AdaptationEngine(clf, EngineConfig(method="tent", optimizer="sgd", lr=5.0, guard=guard))  # far too big
    st = eng.new_state()
    reasons = [r.rollback_reason for r in (eng.step(st, b) for b in x.split(8)) if r.rolled_back]
    assert reasons and all(isinstance(r, Fallback) for r in reasons)
    assert st.rollbacks == len(reasons)
    # the same stream with a sane step size is left alone
    sane = AdaptationEngine(clf, EngineConfig(method="tent", optimizer="sgd", lr=1e-3, guard=guard))
    s2 = sane.new_state()
    assert not any(sane.step(s2, b).rolled_back for b in x.split(8)) and s2.rollbacks == 0


def test_guard_config_is_validated():
    with pytest.raises(ValueError):
        GuardConfig(check_share=1.5)
    with pytest.raises(ValueError, match="update_images"):
        _engine(_models()["vit"](), update_images=0)
    with pytest.raises(ValueError, match="bn_stats"):
        _engine(_models()["resnet"](), bn_stats="running")
    assert dataclasses.asdict(GuardConfig())["check_share"] == 0.25


def _always_disagrees(**kw):
    """A guard that finds the source better as soon as it has 8 checked images (every threshold but agreement off)."""
    return GuardConfig(enabled=True, check_share=1.0, warmup_images=8, warmup_checks=8, source_confidence=0.0,
                       min_source_confident=0.0, min_agreement=1.01, min_source_diversity=0.0, max_class_share=1.01,
                       max_excess_share=2.0, max_entropy=1.01, hold_images=1000, **kw)


def _norm(st):
    return {k: v.clone() for k, v in st.tensors.items() if k.startswith("norm.")}


@pytest.mark.parametrize("statistics", [True, False])
def test_guard_hold_keeps_statistics_adapting_then_escalates_to_source(statistics):
    eng = _engine(_models()["resnet"](), "tent", "sgd", guard=_always_disagrees(hold_statistics=statistics), **SMALL)
    st = eng.new_state()
    source_norm = _norm(eng.new_state())
    first = eng.step(st, _images(8, 1))
    assert first.rolled_back and first.rollback_reason == Fallback.SOURCE_DISAGREEMENT
    assert float(st.tensors["guard.hold"]) == 1000 and float(st.tensors["guard.hold_stats"]) == float(statistics)
    held = eng.step(st, _images(4, 2))               # 4 checked images since the fallback: not judged yet
    assert held.skipped_reason == "guard_hold" and not held.rolled_back
    assert torch.equal(st.theta, eng.theta0)         # parameters at source during any hold
    assert _same(_norm(st), source_norm) is not statistics   # statistics adapt only in a statistics-only hold
    nxt = eng.step(st, _images(4, 3))                # 8 checked images: a statistics-only hold is judged again
    assert nxt.rolled_back is statistics and st.rollbacks == 1 + int(statistics)
    if statistics:                                   # escalated: full source hold, counted with its reason
        assert nxt.rollback_reason == Fallback.SOURCE_DISAGREEMENT
        assert float(st.tensors["guard.hold_stats"]) == 0 and float(st.tensors["guard.backoff"]) == 2
    eng.step(st, _images(4, 4))
    assert _same(_norm(st), source_norm) and torch.equal(st.theta, eng.theta0)


def test_guard_fallback_keeps_the_annotations_an_exact_reset_clears():
    """The guard's own return to source is not a client's reset: the layers above keep their annotations (the
    service's idempotency records; losing them would let a retried request step twice)."""
    eng = _engine(_models()["resnet"](), "tent", "sgd", guard=_always_disagrees(), **SMALL)
    st = eng.new_state()
    st.annotations["idempotency"] = '[{"key":"k1"}]'
    res = eng.step(st, _images(8, 1))
    assert res.rolled_back and float(st.tensors["guard.hold"]) == 1000 and st.resets == 0
    assert st.annotations == {"idempotency": '[{"key":"k1"}]'}
    eng.reset(st)
    assert st.annotations == {} and st.resets == 1


# ------------------------------------------------------------------------------- holds end with their domain
def _other_domain(n, seed):
    """Images of another 'corruption': low contrast, shifted mean, blurred (each descriptor feature moves)."""
    x = _images(n, seed)
    return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1) * 0.3 + 0.5


def test_image_descriptor_is_per_image_and_sees_contrast_and_blur():
    x = _images(6, 1)
    d = image_descriptor(x)
    assert d.shape == (6, 4) and torch.allclose(image_descriptor(x[2:3]), d[2:3])
    o = image_descriptor(_other_domain(6, 1))
    assert bool((o[:, 0] > d[:, 0] + 0.4).all() and (o[:, 1] < d[:, 1]).all() and (o[:, 2] < d[:, 2]).all())


@pytest.mark.parametrize("threshold", [None, 3.0])
def test_guard_hold_ends_early_when_the_domain_changes(threshold):
    """A hold is for the domain that caused it: with ``shift_threshold`` set, new data ends it (counted, backoff
    cleared) and the stream adapts again; without it the hold runs its 1000 images out."""
    eng = _engine(_models()["resnet"](), "tent", "sgd",
                  guard=_always_disagrees(shift_threshold=threshold, shift_reference_images=8), **SMALL)
    st = eng.new_state()
    assert eng.step(st, _images(8, 1)).rollback_reason == Fallback.SOURCE_DISAGREEMENT
    for i in range(4):                       # same domain: the hold goes on (the reference is complete after 8)
        res = eng.step(st, _images(4, 10 + i))
        assert res.skipped_reason == "guard_hold" and res.hold_released is None
    assert float(st.tensors["guard.shift_ref_n"]) == 8 and shift_score(eng.config.guard, st.group("guard")) < 3.0
    released = eng.step(st, _other_domain(4, 20)).hold_released
    hold, backoff = float(st.tensors["guard.hold"]), float(st.tensors["guard.backoff"])
    nxt = eng.step(st, _other_domain(4, 30))
    if threshold is None:
        assert released is None and nxt.skipped_reason == "guard_hold" and not nxt.rolled_back
        assert hold > 900 and backoff == 1 and st.rollbacks == 1
        return
    assert released == HoldRelease.DOMAIN_SHIFT and hold == 0 and backoff == 0
    # adapting again: the next request takes the method's gradient (and this always-disagreeing guard, judging
    # it, falls back once more: a first fallback again, as the backoff was cleared)
    assert nxt.skipped_reason != "guard_hold" and nxt.rolled_back and st.rollbacks == 2
    assert float(st.tensors["guard.backoff"]) == 1 and float(st.tensors["guard.shift_ref_n"]) == 0


def test_guard_shift_reference_is_built_per_hold_and_restarts_at_a_fallback():
    cfg = GuardConfig(enabled=True, shift_reference_images=8, shift_threshold=2.0)
    g = guard_init_state(10, "cpu")
    logits = torch.randn(4, 10)
    g = observe(cfg, g, logits, None, images=_images(4, 1))            # not holding: no reference
    assert float(g["shift_ref_n"]) == 0 and not bool(torch.isnan(g["shift_fast"]).any())
    g = observe(cfg, g, logits, None, images=_images(4, 2), holding=True)
    assert float(g["shift_ref_n"]) == 4 and shift_score(cfg, g) == 0.0  # not complete: never a shift
    g = observe(cfg, g, logits, None, images=_images(4, 3), holding=True)
    ref = g["shift_ref"].clone()
    g = observe(cfg, g, logits, None, images=_other_domain(4, 4), holding=True)
    assert torch.equal(g["shift_ref"], ref) and shift_score(cfg, g) > 2.0  # frozen; the fast EMA moved
    with pytest.raises(ValueError, match="shift_threshold"):
        GuardConfig(shift_threshold=0.0)



def test_a_hold_release_is_counted_in_the_metrics_and_sent_in_the_response():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from service.dataplane import DataPlane
    from service.metrics import ServiceMetrics
    from service.schemas import PredictResponse

    eng = _engine(_models()["vit"](), "noadapt")
    res = dataclasses.replace(eng.step(eng.new_state(), _images(1, 0)), hold_released=HoldRelease.DOMAIN_SHIFT)
    metrics = ServiceMetrics()
    DataPlane._record(SimpleNamespace(svc=SimpleNamespace(metrics=metrics)), res, 1, {})  # type: ignore[arg-type]
    assert 'tta_guard_hold_releases_total{reason="domain_shift"} 1.0' in generate_latest(metrics.registry).decode()
    assert "hold_released" in PredictResponse.model_fields


# ------------------------------------------------------------------------------- a confident source: stay there
def _peaked(labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Logits predicting ``labels`` with a top-class margin ``margin`` (large: confident, small: uncertain)."""
    out = torch.zeros(len(labels), 10)
    out[torch.arange(len(labels)), labels] = margin
    return out


def _confident_signals(cfg: GuardConfig, adapted_margin: float, source_labels=None, rounds: int = 3):
    """Guard signals after ``rounds`` 4-image requests, every image checked; the source predicts ``0..3`` with a
    margin of 12 (normalised entropy ~0.0003), the adapted model the same classes with ``adapted_margin``, or
    ``source_labels`` for the source (a source that confidently predicts one class while the adapted model differs)."""
    g = guard_init_state(10, "cpu")
    labels = torch.arange(4)
    for _ in range(rounds):
        g = observe(cfg, g, _peaked(labels, adapted_margin), _peaked(labels if source_labels is None
                                                                     else source_labels, 12.0))
    return g


def test_guard_confident_source_falls_back_before_its_warm_up():
    """The source is confident and the adapted model, agreeing with it, is clearly less certain: with
    ``confident_entropy`` set the guard falls back from ``confident_checks`` checked images on, long before the
    usual warm-up (64 images); off (None) or before ``confident_checks`` it does not judge."""
    cfg = GuardConfig(enabled=True, check_share=1.0, confident_entropy=0.1, confident_checks=8)
    g = _confident_signals(cfg, adapted_margin=3.0)            # adapted entropy ~0.44: far less certain
    assert float(g["source_entropy"]) < 0.01 and float(g["entropy_gap"]) > 0.3
    assert judge(cfg, g, images=12) == Fallback.CONFIDENT_SOURCE
    assert judge(dataclasses.replace(cfg, confident_entropy=None), g, images=12) is None
    assert judge(cfg, _confident_signals(cfg, 3.0, rounds=1), images=4) is None          # 4 < 8 checked images
    # thresholds at their limits: a gap just above the one measured, a source entropy just below the one measured
    gap, se = float(g["entropy_gap"]), float(g["source_entropy"])
    assert judge(dataclasses.replace(cfg, confident_entropy_gap=gap + 1e-3), g, images=12) is None
    assert judge(dataclasses.replace(cfg, confident_entropy=se * 0.5), g, images=12) is None
    assert judge(dataclasses.replace(cfg, confident_entropy=se * 1.01), g, images=12) == Fallback.CONFIDENT_SOURCE


def test_guard_confident_source_leaves_helpful_adaptation_alone():
    cfg = GuardConfig(enabled=True, check_share=1.0, confident_entropy=0.1, confident_checks=8)
    # the adapted model as certain as the source: no fallback
    assert judge(cfg, _confident_signals(cfg, adapted_margin=12.0), images=12) is None
    # a source that confidently predicts one class for everything, overturned by the adapted model: adaptation is
    # what helps there (agreement 0.25 < confident_agreement), no hold
    g = _confident_signals(cfg, adapted_margin=3.0, source_labels=torch.zeros(4, dtype=torch.long))
    assert float(g["agreement"]) == pytest.approx(0.25) and judge(cfg, g, images=12) is None
    # a confident source predicting one class for everything, the adapted model agreeing but less certain: a
    # source like that is no reference (min_source_diversity), whatever its confidence
    one = torch.zeros(4, dtype=torch.long)
    g = guard_init_state(10, "cpu")
    for _ in range(3):
        g = observe(cfg, g, _peaked(one, 3.0), _peaked(one, 12.0))
    assert float(g["agreement"]) == 1.0 and float(g["entropy_gap"]) > 0.3 and judge(cfg, g, images=12) is None
    assert judge(dataclasses.replace(cfg, min_source_diversity=0.0), g, images=12) == Fallback.CONFIDENT_SOURCE
    # an uncertain source (entropy above confident_entropy): the usual checks only
    g = guard_init_state(10, "cpu")
    for _ in range(3):
        g = observe(cfg, g, _peaked(torch.arange(4), 3.0), _peaked(torch.arange(4), 2.0))
    assert float(g["source_entropy"]) > 0.1 and judge(cfg, g, images=12) is None


def test_a_confident_source_predicting_few_classes_is_not_failing():
    """While holding: a source predicting few classes is 'failing' (the hold ends) unless it is confident, which is
    what label shift looks like; with ``confident_entropy`` None the older rule holds."""
    from mgg_core.guard import source_failing

    cfg = GuardConfig(enabled=True, check_share=1.0, confident_entropy=0.1, warmup_checks=8)
    one = torch.zeros(4, dtype=torch.long)
    g = guard_init_state(10, "cpu")
    for _ in range(3):
        g = observe(cfg, g, _peaked(one, 12.0), _peaked(one, 12.0))       # held: adapted = source, one class
    assert float(g["source_entropy"]) < 0.1 and not source_failing(cfg, g)
    assert source_failing(dataclasses.replace(cfg, confident_entropy=None), g)
    assert source_failing(dataclasses.replace(cfg, confident_keeps_hold=False), g)
    u = guard_init_state(10, "cpu")
    for _ in range(3):
        u = observe(cfg, u, _peaked(one, 1.0), _peaked(one, 1.0))         # an uncertain source on one class
    assert float(u["source_entropy"]) > 0.1 and source_failing(cfg, u)


def test_guard_confident_source_config_limits():
    for bad in ({"confident_entropy": 0.0}, {"confident_entropy": 1.5}, {"confident_entropy_gap": -0.1},
                {"confident_agreement": 1.1}, {"confident_checks": 0}):
        with pytest.raises(ValueError, match="confident"):
            GuardConfig(**bad)
    GuardConfig(confident_entropy=1.0, confident_entropy_gap=0.0, confident_agreement=1.0, confident_checks=1)


def _clean_digits(n: int, by_class: bool = False):
    """The bundled ResNet and ``n`` clean test digits (seeded), i.i.d. or sorted by class (label shift)."""
    import numpy as np

    from mgg_core.classifier import default_checkpoint, load_classifier
    from mgg_core.data.sources import mnist5k

    clf = load_classifier(default_checkpoint("resnet"))
    src = mnist5k("test")
    order = np.random.default_rng(0).permutation(len(src))[:400]
    if by_class:
        order = order[np.argsort(np.asarray(src.labels)[order], kind="stable")]
    return clf, clf.preprocessor(np.stack([src.get_image(int(i)) for i in order[:n]]))


@pytest.mark.parametrize("by_class,lr,falls_back", [(True, 1e-4, True), (False, 0.05, False)])
def test_engine_holds_at_a_confident_source_when_adaptation_degrades(by_class, lr, falls_back):
    """Clean digits: the bundled source is confident and right. Sorted by class, the per-stream statistics make the
    adapted model less certain than the source while it still agrees with it: the guard falls back to source with
    ``confident_source`` long before the usual warm-up (here 1000 images: no other check judges), holds there and
    counts it. On the i.i.d. stream TENT makes the model more certain: the same guard leaves it alone."""
    clf, x = _clean_digits(128, by_class)
    guard = GuardConfig(enabled=True, confident_entropy=0.2, confident_entropy_gap=0.02, confident_checks=8,
                        hold_images=1000, warmup_images=1000, min_source_diversity=0.0)   # one class per request
    eng = AdaptationEngine(clf, EngineConfig(method="tent", optimizer="sgd", lr=lr, bn_stats="ema", bn_momentum=0.001,
                                             update_images=16, guard=guard))
    st = eng.new_state()
    results = [eng.step(st, b) for b in x.split(16)]
    first = next((i for i, r in enumerate(results) if r.rolled_back), None)
    if not falls_back:
        assert first is None and st.rollbacks == 0 and float(st.tensors["guard.entropy_gap"]) < 0.02
        return
    assert first is not None and results[first].rollback_reason == Fallback.CONFIDENT_SOURCE and st.rollbacks == 1
    assert all(r.skipped_reason == "guard_hold" for r in results[first + 1:])
    assert torch.equal(st.theta, eng.theta0)


def test_confident_source_guard_is_fingerprinted():
    model = _models()["resnet"]()
    on = _engine(model, "tent", guard=GuardConfig(enabled=True, confident_entropy=0.1), **SMALL)
    off = _engine(model, "tent", guard=GuardConfig(enabled=True, confident_entropy=None), **SMALL)
    assert on.fingerprint["guard_confident_entropy"] == 0.1 and "guard_confident_entropy" not in off.fingerprint
    # the source entropy is state only when judged: default engines keep the older snapshot layout
    assert "guard.source_entropy" in on.new_state().tensors and "guard.source_entropy" not in off.new_state().tensors
