"""Confident holds (``GuardConfig.confident_hold_entropy``): a guard hold at source does not end as ``source_failing``
while the source's entropy EMA on the checked images is at most the setting (label shift: a right, confident source
predicts few classes). The EMA (``guard.source_entropy``) is stream state: reset exactly, restored bit-identically,
counted, fingerprinted; two interleaved streams equal the same streams alone."""
from __future__ import annotations

import math

import pytest
import torch
from test_guard_judge_rate import check_guard_setting
from test_normstats_depth import _engine, _images, _restore_and_continue, _same

from mgg_core.guard import GuardConfig, confident_hold, source_failing
from mgg_core.reasons import HoldRelease

#: every source counts as failing by diversity (min_source_diversity > 1) once 2 images were checked
FAILING = dict(enabled=True, check_share=1.0, warmup_images=4, warmup_checks=2, horizon_images=16,
               min_source_diversity=1.01, hold_images=1000, shift_threshold=None, max_entropy=1.01,
               max_class_share=1.01)


def _signals(entropy: float) -> dict[str, torch.Tensor]:
    hist = torch.zeros(10)
    hist[3] = 1.0                                  # the source predicts one class: diversity 0
    return {"checked": torch.tensor(20.0), "source_hist": hist, "source_entropy": torch.tensor(entropy)}


def test_source_failing_keeps_a_hold_while_the_source_is_confident():
    off = GuardConfig(min_source_diversity=0.5)
    on = GuardConfig(min_source_diversity=0.5, confident_hold_entropy=0.1)
    assert source_failing(off, _signals(0.05)) and source_failing(off, _signals(0.5))
    assert not source_failing(on, _signals(0.05)) and not source_failing(on, _signals(0.099))   # below: kept
    assert source_failing(on, _signals(0.11))                                                 # less confident
    assert source_failing(on, _signals(float("nan")))                                          # unset EMA
    no_ema = {k: v for k, v in _signals(0.05).items() if k != "source_entropy"}
    assert source_failing(on, no_ema) and not confident_hold(on, no_ema)
    # the session-5 form (confident_entropy with confident_keeps_hold) is unchanged; the new limit takes precedence
    s5 = GuardConfig(min_source_diversity=0.5, confident_entropy=0.2)
    assert not source_failing(s5, _signals(0.15)) and source_failing(s5, _signals(0.25))
    both = GuardConfig(min_source_diversity=0.5, confident_entropy=0.2, confident_hold_entropy=0.1)
    assert source_failing(both, _signals(0.15))


def _held(limit: float | None, sizes=(1, 2, 1, 4, 3, 1)) -> list[HoldRelease | None]:
    """Releases of a stream put on a hold at source (``guard.hold``), then sent ``sizes`` requests."""
    eng = _engine("eata", guard=GuardConfig(**FAILING, confident_hold_entropy=limit), bn_stats="ema",
                  bn_momentum=0.01, update_images=4)
    st = eng.new_state(seed=1)
    st.tensors["guard.hold"] = torch.full_like(st.tensors["guard.hold"], 1000.0)
    return [eng.step(st, _images(n, 40 + i)).hold_released for i, n in enumerate(sizes)]


def test_a_hold_at_a_confident_source_is_not_released_as_source_failing():
    released = _held(None)
    assert HoldRelease.SOURCE_FAILING in released                     # without the setting: released
    assert released.index(HoldRelease.SOURCE_FAILING) == 1            # once 2 images were checked (1 + 2)
    assert _held(1.0) == [None] * 6                                   # every source confident: kept
    assert _held(1e-6)[1] is HoldRelease.SOURCE_FAILING               # no source that confident: as without


def test_confident_hold_state_resets_restores_counts_and_is_fingerprinted(tmp_path):
    guard = dict(enabled=True, check_share=0.5, warmup_images=1000, warmup_checks=1)   # no fallback here
    eng = _engine("eata", guard=GuardConfig(**guard, confident_hold_entropy=0.2), bn_stats="ema", bn_momentum=0.01,
                  update_images=4)
    off = _engine("eata", guard=GuardConfig(**guard), bn_stats="ema", bn_momentum=0.01, update_images=4)
    fresh, st = eng.new_state(seed=1), eng.new_state(seed=1)
    assert "guard.source_entropy" not in off.new_state().tensors
    assert st.nbytes() == off.new_state().nbytes() + 4               # one float32 EMA
    for i, n in enumerate((4, 2, 1, 3)):
        eng.step(st, _images(n, 10 + i))
    assert not math.isnan(float(st.tensors["guard.source_entropy"]))
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["guard_confident_hold_entropy"] == 0.2
    assert "guard_confident_hold_entropy" not in off.fingerprint
    with pytest.raises(Exception, match="guard_confident_hold_entropy"):
        off.load_state(tmp_path / "s.safetensors")
    old = off.new_state(seed=1)                                      # a snapshot from before the setting
    off.step(old, _images(4, 3))
    old.save(tmp_path / "old.safetensors")
    with pytest.raises(Exception, match="guard_confident_hold_entropy"):
        eng.load_state(tmp_path / "old.safetensors")


def test_interleaved_streams_with_confident_holds_equal_streams_run_alone():
    cfg = GuardConfig(**{**FAILING, "min_source_diversity": 0.3, "min_agreement": 1.01, "source_confidence": 0.0,
                         "min_source_confident": 0.0}, confident_hold_entropy=0.5, judge_images=4)
    eng = _engine("eata", guard=cfg, bn_stats="ema", bn_momentum=0.01, bn_momentum_shallow=0.2, update_images=4)
    sizes_a, sizes_b = [1, 2, 1, 1, 4, 1, 3, 2], [3, 1, 1, 2, 1, 1, 5, 1]

    def alone(seed, sizes, base):
        st = eng.new_state(seed=seed)
        return [eng.step(st, _images(n, base + i)) for i, n in enumerate(sizes)], st

    ra, sa_alone = alone(1, sizes_a, 1000)
    rb, sb_alone = alone(2, sizes_b, 2000)
    assert any(r.rolled_back for r in ra + rb)                        # the guard acted on these streams
    sa, sb = eng.new_state(seed=1), eng.new_state(seed=2)
    for i, (na, nb) in enumerate(zip(sizes_a, sizes_b, strict=True)):
        a, b = eng.step(sa, _images(na, 1000 + i)), eng.step(sb, _images(nb, 2000 + i))
        assert torch.equal(a.logits, ra[i].logits) and torch.equal(b.logits, rb[i].logits)
        assert (a.rollback_reason, a.hold_released) == (ra[i].rollback_reason, ra[i].hold_released)
        assert (b.rollback_reason, b.hold_released) == (rb[i].rollback_reason, rb[i].hold_released)
    _same(sa.tensors, sa_alone.tensors)
    _same(sb.tensors, sb_alone.tensors)


def test_guard_confident_hold_entropy_is_a_validated_setting_that_reaches_the_engine(monkeypatch):
    eng = check_guard_setting(monkeypatch, "confident_hold_entropy", (0.0, -0.1, 1.5), 1.0, "0.3", 0.3)
    assert "guard.source_entropy" in eng.new_state().tensors


def test_interleaved_held_streams_kept_by_confident_holds_equal_streams_run_alone():
    # both streams held at a source that counts as failing by diversity (FAILING): without the setting their holds
    # end as source_failing; with it (every source confident enough) confident_hold keeps them, per stream, and
    # interleaving changes nothing
    sizes_a, sizes_b = [1, 2, 1, 1, 4, 1], [3, 1, 1, 2, 1, 1]

    def run(limit, pairs):
        eng = _engine("eata", guard=GuardConfig(**FAILING, confident_hold_entropy=limit), bn_stats="ema",
                      bn_momentum=0.01, update_images=4)
        states = {}
        for seed in (1, 2):
            states[seed] = st = eng.new_state(seed=seed)
            st.tensors["guard.hold"] = torch.full_like(st.tensors["guard.hold"], 1000.0)
        out = {1: [], 2: []}
        for seed, i, n in pairs:
            out[seed].append(eng.step(states[seed], _images(n, 1000 * seed + i)))
        return out, states

    alone = [(1, i, n) for i, n in enumerate(sizes_a)] + [(2, i, n) for i, n in enumerate(sizes_b)]
    mixed = [p for i in range(len(sizes_a)) for p in ((1, i, sizes_a[i]), (2, i, sizes_b[i]))]
    released, _ = run(None, alone)
    assert all(any(r.hold_released is HoldRelease.SOURCE_FAILING for r in released[s]) for s in (1, 2))
    ra, sa = run(1.0, alone)
    rm, sm = run(1.0, mixed)
    for s in (1, 2):
        assert all(r.hold_released is None for r in ra[s] + rm[s])          # kept by confident_hold
        assert float(sa[s].tensors["guard.hold"]) > 0
        for x, y in zip(ra[s], rm[s], strict=True):
            assert torch.equal(x.logits, y.logits)
        _same(sa[s].tensors, sm[s].tensors)
