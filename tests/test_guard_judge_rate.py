"""The guard's decision rate per image (``GuardConfig.judge_images``): outside holds a stream is judged once at least
``judge_images`` images arrived since its last judgement, so small requests are not judged more often than large ones.
The count (``guard.since_judge``) is stream state: reset exactly, restored bit-identically, counted, fingerprinted."""
from __future__ import annotations

import pytest
from test_normstats_depth import _engine, _images, _resnet, _restore_and_continue, _same

from mgg_core.engine import AdaptationEngine
from mgg_core.guard import GuardConfig

#: a guard that falls back (source disagreement -> hold at source) at its first judgement after a 4-image warm-up
HOLD = dict(enabled=True, check_share=0.5, warmup_images=4, warmup_checks=2, horizon_images=16, min_agreement=1.01,
            source_confidence=0.0, min_source_confident=0.0, min_source_diversity=0.0, hold_images=1000,
            max_entropy=1.01, max_class_share=1.01)


def _first_fallback(judge_images, size: int) -> int:
    """Images the stream had seen when the guard first fell back (requests of ``size`` images)."""
    eng = _engine("eata", guard=GuardConfig(**HOLD, judge_images=judge_images), bn_stats="ema", bn_momentum=0.01,
                  update_images=4)
    st = eng.new_state(seed=2)
    for i in range(40):
        if eng.step(st, _images(size, 300 + i)).rolled_back:
            return (i + 1) * size
    raise AssertionError("the guard never fell back")


def test_the_guard_judges_once_per_judge_images_images():
    assert _first_fallback(None, 2) == 4            # every request: at the end of the 4-image warm-up
    assert _first_fallback(None, 8) == 8
    assert _first_fallback(16, 2) == 16             # 2-image requests: judged once 16 images arrived
    assert _first_fallback(16, 4) == 16
    assert _first_fallback(16, 8) == 16
    assert _first_fallback(16, 32) == 32            # a request larger than judge_images: judged after each one
    assert _first_fallback(1, 2) == _first_fallback(None, 2)   # 1 image: every request, as without the setting


def test_judge_count_state_resets_restores_counts_and_is_fingerprinted(tmp_path):
    eng = _engine("eata", guard=GuardConfig(**{**HOLD, "min_agreement": 0.0}, judge_images=16), bn_stats="ema",
                  bn_momentum=0.01, update_images=4)
    off = _engine("eata", guard=GuardConfig(**{**HOLD, "min_agreement": 0.0}), bn_stats="ema", bn_momentum=0.01,
                  update_images=4)
    fresh, st = eng.new_state(seed=1), eng.new_state(seed=1)
    assert "guard.since_judge" not in off.new_state().tensors
    assert st.nbytes() == off.new_state().nbytes() + 4              # one float32 count
    for n in (4, 2, 1):
        eng.step(st, _images(n, 10 + n))
    assert float(st.tensors["guard.since_judge"]) == 7.0
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["guard_judge_images"] == 16 and "guard_judge_images" not in off.fingerprint
    with pytest.raises(Exception, match="guard_judge_images"):
        off.load_state(tmp_path / "s.safetensors")
    old = off.new_state(seed=1)                                      # a snapshot from before the setting
    off.step(old, _images(4, 3))
    old.save(tmp_path / "old.safetensors")
    with pytest.raises(Exception, match="guard_judge_images"):        # refused naming it, not loaded silently
        eng.load_state(tmp_path / "old.safetensors")


def check_guard_setting(monkeypatch, field: str, bad: tuple, edge, env: str, want) -> AdaptationEngine:
    """A guard setting (``GuardConfig.<field>``, service setting ``guard_<field>``) refuses each of ``bad`` in both
    places, accepts its ``edge`` value, and from the environment (``env``) reaches the engine's config and
    ``describe()`` as ``want``; returns that engine."""
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    for value in bad:
        with pytest.raises(ValueError, match=field):
            GuardConfig(**{field: value})
        with pytest.raises(ValidationError, match=f"guard_{field}"):
            ServiceSettings(_env_file=None, **{f"guard_{field}": value})
    assert getattr(GuardConfig(**{field: edge}), field) == edge
    monkeypatch.setenv(f"{ENV_PREFIX}GUARD_{field.upper()}", env)
    cfg = engine_config(ServiceSettings(_env_file=None), build_method("eata", 10), "cpu", None)
    assert getattr(cfg.guard, field) == want
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.describe()["guard"][field] == want
    return eng


def test_guard_judge_images_is_a_validated_setting_that_reaches_the_engine(monkeypatch):
    eng = check_guard_setting(monkeypatch, "judge_images", (0, -1, 1_000_001), 1_000_000, "48", 48)
    assert "guard.since_judge" in eng.new_state().tensors


def _first_anchor(judge_images, size: int, anchor_every: int = 16) -> int:
    """Images the stream had seen when the guard first took an anchor (a healthy stream, requests of ``size``)."""
    healthy = {**HOLD, "min_agreement": 0.0, "max_excess_share": 1.01, "max_entropy_gap": 10.0,
               "anchor_every_images": anchor_every}
    eng = _engine("tent", guard=GuardConfig(**healthy, judge_images=judge_images), bn_stats="ema", bn_momentum=0.01,
                  update_images=4)
    st = eng.new_state(seed=2)
    assert st.anchor is None
    for i in range(80):
        res = eng.step(st, _images(size, 300 + i))
        assert not res.rolled_back
        if st.anchor is not None:
            return (i + 1) * size
    raise AssertionError("the guard never took an anchor")


def test_anchors_come_every_anchor_every_images_whatever_the_request_size():
    """A judgement counts every image since the previous one toward the healthy streak: judged once per 16 images,
    2-, 4- and 8-image streams take their first anchor after anchor_every_images images (before the fix a judgement
    counted only its own request: 4-image requests anchored after 64 images, 1-image ones 16x less often)."""
    for size in (2, 4, 8):
        assert _first_anchor(16, size) == 16, size
    assert _first_anchor(16, 4, anchor_every=32) == 32
    assert _first_anchor(None, 4) == 16     # judged after every request: as before
