"""Kept source history (``GuardConfig.keep_source_history``, service setting ``guard_keep_source_history``): the
guard's source-diversity checks read a source prediction histogram (``guard.source_history``) that a fallback keeps
(only a stream reset clears it), while the comparisons of the adapted model with the source keep using the fresh
``guard.source_hist``. Off by default; when on, the new per-stream tensor resets exactly, survives snapshot ->
restore -> continue, is counted in the state's bytes and the setting is fingerprinted."""
from __future__ import annotations

import functools

import pytest
import torch
from test_fused import _digits
from test_fused import _resnet as _bundled_resnet
from test_guard_judge_rate import check_guard_setting
from test_normstats_depth import _interleaved_equals_alone, _restore_and_continue, _same

from mgg_core.engine import AdaptationEngine, EngineConfig
from mgg_core.guard import GuardConfig, judge, source_diversity, source_failing, source_reference
from mgg_core.reasons import RollbackReason

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: judged after a 4-image warm-up (2 checked images); falls back for a partial collapse at every judgement against a
#: source whose predictions are diverse enough (max_excess_share -1), never anchored (so each fallback goes to
#: source and adapts on at once), no other reason. The bundled ResNet's predictions on clean digits reach a
#: normalised entropy of 0.5 after 8 requests of 4; a fresh histogram after one request does not.
GUARD = dict(enabled=True, check_share=0.5, warmup_images=4, warmup_checks=2, horizon_images=64, max_entropy=1.01,
             max_class_share=1.01, max_excess_share=-1.0, min_agreement=0.0, anchor_every_images=100_000,
             min_source_diversity=0.5, shift_threshold=None)


@functools.cache
def _eng(keep: bool) -> AdaptationEngine:
    cfg = EngineConfig(method="eata", optimizer="sgd", lr=0.01, bn_stats="ema",
                       guard=GuardConfig(**GUARD, keep_source_history=keep))
    return AdaptationEngine(_bundled_resnet(), cfg, num_classes=10)


def _x(n: int, seed: int) -> torch.Tensor:
    pool = _digits("resnet")
    return pool[torch.randint(0, pool.shape[0], (n,), generator=torch.Generator().manual_seed(seed))]


def _run(eng, steps=12, size=4, seed=0):
    st = eng.new_state(seed=1)
    return st, [eng.step(st, _x(size, seed + i)) for i in range(steps)]


def _falls(res) -> list[int]:
    return [i for i, r in enumerate(res) if r.rolled_back]


def test_after_a_fallback_the_kept_history_lets_the_guard_judge_against_the_source_again():
    """Off: after the first fallback (request 8) the fresh source histogram of a few requests is below
    min_source_diversity and the guard judges nothing for the rest of the stream. On: the same first fallback (the
    kept history equals the fresh one until then), and the guard judges (and here falls back) at every request after
    it, because the kept history stays diverse while the fresh one starts again from nothing."""
    st_off, off = _run(_eng(False))
    st_on, on = _run(_eng(True))
    assert _falls(off) == [8]
    assert _falls(on) == [8, 9, 10, 11]
    assert all(r.rollback_reason is RollbackReason.PARTIAL_COLLAPSE for r in on if r.rolled_back)
    for i in range(8):                       # the same stream until the first fallback
        assert torch.equal(off[i].logits, on[i].logits)
    g = {k[6:]: v for k, v in st_on.tensors.items() if k.startswith("guard.")}
    assert source_diversity(g["source_history"]) >= 0.5 > source_diversity(g["source_hist"])
    assert "guard.source_history" not in st_off.tensors


def test_the_history_equals_the_fresh_histogram_until_a_fallback_and_is_kept_by_one():
    eng = _eng(True)
    st = eng.new_state(seed=1)
    for i in range(8):
        eng.step(st, _x(4, i))
        assert torch.equal(st.tensors["guard.source_history"], st.tensors["guard.source_hist"])
    before = st.tensors["guard.source_history"].clone()
    res = eng.step(st, _x(4, 8))
    assert res.rolled_back
    assert float(st.tensors["guard.source_hist"].sum()) == 0.0            # the fresh one was reset ...
    assert not torch.equal(st.tensors["guard.source_history"], before)    # ... the kept one took the request too
    keep = (1 - 1 / GUARD["horizon_images"]) ** 4
    assert float(st.tensors["guard.source_history"].sum()) == pytest.approx(keep * float(before.sum()) + (1 - keep))


def test_the_diversity_checks_read_the_kept_history():
    cfg = GuardConfig(**{**GUARD, "max_excess_share": 0.3})
    narrow, wide = torch.zeros(10), torch.full((10,), 0.1)
    narrow[3] = 1.0
    adapted = torch.zeros(10)
    adapted[5] = 1.0
    g = {"class_share": adapted.clone(), "entropy_ema": torch.tensor(0.2), "checked": torch.tensor(16.0),
         "adapted_hist": adapted, "source_hist": narrow, "confident": torch.tensor(0.0),
         "agreement": torch.tensor(float("nan")), "confident_share": torch.tensor(0.0),
         "entropy_gap": torch.tensor(0.0), "hold": torch.tensor(0.0)}
    assert judge(cfg, g, 64) is None and source_failing(cfg, g)            # the fresh histogram: no reference
    kept = {**g, "source_history": wide}
    assert source_reference(kept) is wide and source_reference(g) is narrow
    assert judge(cfg, kept, 64) is RollbackReason.PARTIAL_COLLAPSE and not source_failing(cfg, kept)


def test_kept_history_state_resets_restores_counts_and_is_fingerprinted(tmp_path):
    eng, off = _eng(True), _eng(False)
    fresh = eng.new_state(seed=1)
    st, res = _run(eng, 10)
    assert _falls(res)
    assert st.nbytes() == off.new_state(seed=1).nbytes() + 10 * 4          # one float32 histogram more
    assert st.tensors.keys() == fresh.tensors.keys()
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["guard_keep_source_history"] is True
    assert "guard_keep_source_history" not in off.fingerprint
    with pytest.raises(Exception, match="guard_keep_source_history"):
        off.load_state(tmp_path / "s.safetensors")
    off.new_state(seed=1).save(tmp_path / "old.safetensors")
    with pytest.raises(Exception, match="guard_keep_source_history"):
        eng.load_state(tmp_path / "old.safetensors")


def test_interleaved_streams_equal_the_same_streams_alone():
    _, rb = _interleaved_equals_alone(_eng(True), [_x(4 if i % 2 else 1, i) for i in range(12)],
                                      [_x(4, 100 + i) for i in range(12)], "rollback_reason")
    assert _falls(rb)


def test_guard_keep_source_history_is_a_setting_that_reaches_the_engine(monkeypatch):
    from pydantic import ValidationError

    from service.settings import ServiceSettings

    assert ServiceSettings(_env_file=None).guard_keep_source_history is False        # off by default
    assert GuardConfig().keep_source_history is False
    with pytest.raises(ValidationError, match="guard_keep_source_history"):
        ServiceSettings(_env_file=None, guard_keep_source_history="sometimes")
    eng = check_guard_setting(monkeypatch, "keep_source_history", (), True, "true", True)
    assert eng.fingerprint["guard_keep_source_history"] is True
    assert "guard.source_history" in eng.new_state().tensors
