"""Collapse holds (``GuardConfig.collapse_hold_images``, service setting ``guard_collapse_hold_images``): a collapse
fallback that goes to source (no healthy anchor) holds the stream there, gradient-free, for that many images, doubled
for every fallback in a row, instead of adapting again at once. Every hold, of either kind, is exposed: the step's
``hold_images``, the response's ``hold_images`` and ``tta_guard_holds_total{reason}``. No new state: the hold and
its backoff are the existing ``guard.hold`` / ``guard.backoff``; the setting is fingerprinted."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from test_guard_judge_rate import HOLD, check_guard_setting
from test_normstats_depth import _engine, _images, _interleaved_equals_alone, _restore_and_continue, _same

from mgg_core.guard import GuardConfig, fallback_hold
from mgg_core.reasons import RollbackReason

#: falls back for entropy divergence at every judgement after a 4-image warm-up (max_entropy 0), never healthy after
#: it, so never anchored; no early hold release (no domain-shift release; a random model's one-class source is not
#: "failing"): deterministic hold lengths
COLLAPSE = dict(enabled=True, check_share=0.5, warmup_images=4, warmup_checks=2, horizon_images=16, max_entropy=0.0,
                anchor_every_images=1000, shift_threshold=None, min_source_diversity=0.0)


def _eng(hold=None, method="eata", update_images=4, **guard):
    return _engine(method, guard=GuardConfig(**{**COLLAPSE, **guard}, collapse_hold_images=hold), bn_stats="ema",
                   bn_momentum=0.01, update_images=update_images)


def _run(eng, steps=12, size=4, seed=0):
    st = eng.new_state(seed=1)
    return st, [eng.step(st, _images(size, seed + i)) for i in range(steps)]


def test_a_collapse_fallback_to_source_holds_there_doubling_in_a_row():
    """This guard finds a collapse at every judgement, so each hold's last request (judged: its hold has run out)
    falls back again: holds of 8, 16, 32 images in a row, every request between them at source."""
    eng = _eng(8)
    st = eng.new_state(seed=1)
    res = [eng.step(st, _images(4, i)) for i in range(8)]
    assert [(i, r.hold_images) for i, r in enumerate(res) if r.rolled_back] == [(0, 8.0), (2, 16.0), (6, 32.0)]
    assert all(r.rollback_reason is RollbackReason.ENTROPY_DIVERGENCE for r in res if r.rolled_back)
    for i in range(1, 8):                     # held: at source, no gradient, no statistics update
        assert res[i].skipped_reason == "guard_hold" and not res[i].adapted
        torch.testing.assert_close(res[i].logits, eng.source_predict(_images(4, i)).cpu(), rtol=0, atol=1e-5)
    assert float(st.tensors["guard.backoff"]) == 3.0 and float(st.tensors["guard.hold"]) == 28.0
    # off: the same guard goes to source and adapts on at once (no hold, none reported)
    off = _run(_eng(None), 8)[1]
    falls_off = [i for i, r in enumerate(off) if r.rolled_back]
    assert falls_off and all(off[i].hold_images is None for i in falls_off)
    assert not any(r.skipped_reason == "guard_hold" for r in off)


def test_a_collapse_fallback_with_an_anchor_restores_it_and_does_not_hold():
    assert fallback_hold(GuardConfig(collapse_hold_images=8), RollbackReason.PARTIAL_COLLAPSE, anchored=True) is None
    assert fallback_hold(GuardConfig(collapse_hold_images=8), RollbackReason.CLASS_COLLAPSE, anchored=False) == 8
    assert fallback_hold(GuardConfig(), RollbackReason.PARTIAL_COLLAPSE, anchored=False) is None
    for reason in (RollbackReason.SOURCE_DISAGREEMENT, RollbackReason.LESS_CERTAIN_THAN_SOURCE):
        assert fallback_hold(GuardConfig(hold_images=5, collapse_hold_images=8), reason, anchored=True) == 5
    # an engine that anchors before its first fallback (TENT, an update per request): the first collapse fallback
    # restores the anchor and adapts on; the next one (no anchor left) goes to source and holds
    eng = _eng(8, method="tent", update_images=1, warmup_images=8, anchor_every_images=4)
    st = eng.new_state(seed=1)
    res = [eng.step(st, _images(4, i)) for i in range(4)]
    assert res[0].adapted and not res[0].rolled_back
    assert res[1].rollback_reason is RollbackReason.ENTROPY_DIVERGENCE and res[1].hold_images is None
    assert res[2].rollback_reason is RollbackReason.ENTROPY_DIVERGENCE and res[2].hold_images == 8.0
    assert res[2].skipped_reason != "guard_hold" and res[3].skipped_reason == "guard_hold"


def test_holds_of_the_source_reasons_report_their_length():
    eng = _engine("eata", guard=GuardConfig(**HOLD), bn_stats="ema", bn_momentum=0.01, update_images=4)
    st = eng.new_state(seed=2)
    res = [eng.step(st, _images(4, 300 + i)) for i in range(4)]
    fall = next(r for r in res if r.rolled_back)
    assert fall.rollback_reason is RollbackReason.SOURCE_DISAGREEMENT and fall.hold_images == 1000.0


def test_collapse_hold_state_resets_restores_counts_and_is_fingerprinted(tmp_path):
    eng, off = _eng(8), _eng(None)
    fresh = eng.new_state(seed=1)
    st, res = _run(eng, 4)
    assert res[-1].skipped_reason == "guard_hold" or float(st.tensors["guard.hold"]) > 0   # mid-hold
    assert st.nbytes() == off.new_state(seed=1).nbytes() and st.tensors.keys() == fresh.tensors.keys()
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["guard_collapse_hold_images"] == 8 and "guard_collapse_hold_images" not in off.fingerprint
    with pytest.raises(Exception, match="guard_collapse_hold_images"):
        off.load_state(tmp_path / "s.safetensors")
    old = off.new_state(seed=1)
    old.save(tmp_path / "old.safetensors")
    with pytest.raises(Exception, match="guard_collapse_hold_images"):
        eng.load_state(tmp_path / "old.safetensors")


def test_interleaved_streams_equal_the_same_streams_alone():
    ra, rb = _interleaved_equals_alone(_eng(8), [_images(4 if i % 2 else 1, i) for i in range(10)],
                                       [_images(2, 100 + i) for i in range(10)], "hold_images")
    assert any(r.hold_images for r in ra + rb)


def test_guard_collapse_hold_images_is_a_validated_setting_that_reaches_the_engine(monkeypatch):
    from service.settings import ServiceSettings

    assert ServiceSettings(_env_file=None).guard_collapse_hold_images is None        # off by default
    eng = check_guard_setting(monkeypatch, "collapse_hold_images", (0, -1, 1_000_001), 1_000_000, "64", 64)
    assert eng.fingerprint["guard_collapse_hold_images"] == 64


def test_a_hold_is_counted_in_the_metrics_and_sent_in_both_responses():
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from service.dataplane import DataPlane
    from service.metrics import ServiceMetrics
    from service.schemas import PredictResponse
    from service.v2.routes import step_parameters

    eng = _eng(8)
    st = eng.new_state(seed=1)
    res = next(r for r in (eng.step(st, _images(4, i)) for i in range(6)) if r.rolled_back)
    assert res.hold_images == 8.0
    metrics = ServiceMetrics()
    DataPlane._record(SimpleNamespace(svc=SimpleNamespace(metrics=metrics)), res, 4, {})  # type: ignore[arg-type]
    text = generate_latest(metrics.registry).decode()
    assert 'tta_guard_holds_total{reason="entropy_divergence"} 1.0' in text
    assert 'tta_rollbacks_total{reason="entropy_divergence"} 1.0' in text
    assert "hold_images" in PredictResponse.model_fields
    out = SimpleNamespace(result=res, step=res.step, post_update=False)
    assert step_parameters("s", out, None)["hold_images"] == 8.0      # type: ignore[arg-type]
    quiet = dataclasses.replace(res, rolled_back=False, rollback_reason=None, hold_images=None)
    assert "hold_images" not in step_parameters("s", SimpleNamespace(result=quiet, step=0, post_update=False), None)
