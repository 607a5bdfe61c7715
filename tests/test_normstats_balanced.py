"""Class-balanced per-stream BatchNorm statistics (``bn_balanced``, normstats module docstring; TRIBE's Balanced BN).

Per layer, per class statistics (``norm.<layer>.cmean`` / ``.cvar``) move only with the request's images of their
class (its pre-pass pseudo-labels), at the layer's per-image momentum; the layer normalises with their class-uniform
mixture merged with the stream's global statistics at weight lambda. The tests check the math against explicit
computations, that a label-shifted stream does not move the balanced statistics toward its class mix (the point of
the feature), request-size independence given the labels, the engine's pseudo-labels, and that the statistics are
exact stream state (reset, fallback, snapshot, bytes, fingerprint, interleaved streams, 1-image requests, settings).
"""
from __future__ import annotations

import pytest
import torch
from test_normstats_depth import _engine, _images, _resnet, _restore_and_continue, _same
from torch import nn

from mgg_core.engine import AdaptationEngine
from mgg_core.guard import GuardConfig
from mgg_core.normstats import (
    CORRECTION_VAR_FLOOR,
    StreamNormStats,
    balanced_moments,
    class_moments,
    class_momentum,
    correction_form,
    share_weight,
    warm_momentum,
)

BAL = dict(bn_stats="ema", bn_momentum=0.001, bn_momentum_shallow=0.2, bn_prior_images=16, update_images=8,
           bn_balanced=1.0)


def test_class_moments_and_the_balanced_mixture_match_explicit_computations():
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(2, 7, 3, 5, generator=gen) * 3 + 1
    labels = torch.tensor([[0, 2, 2, 0, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]])
    onehot = (labels.unsqueeze(-1) == torch.arange(4)).float()
    mean, var = class_moments(xs, onehot)
    for s in range(2):
        for k in range(4):
            rows = xs[s][labels[s] == k]
            if len(rows) == 0:
                assert torch.all(mean[s, k] == 0) and torch.all(var[s, k] == 0)
                continue
            flat = rows.permute(1, 0, 2).reshape(3, -1)
            torch.testing.assert_close(mean[s, k], flat.mean(1))
            torch.testing.assert_close(var[s, k], flat.var(1, unbiased=False))
    # the class-uniform mixture of equal-size class populations is their pooled mean and variance
    pops = [torch.randn(3, 400, generator=gen) * (k + 1) + 2 * k for k in range(3)]
    cm = torch.stack([p.mean(1) for p in pops])
    cv = torch.stack([p.var(1, unbiased=False) for p in pops])
    b_mean, b_var = balanced_moments(cm, cv)
    pooled = torch.cat(pops, 1)
    torch.testing.assert_close(b_mean, pooled.mean(1))
    torch.testing.assert_close(b_var, pooled.var(1, unbiased=False))


def test_class_momentum_is_the_per_image_momentum_per_class():
    counts = torch.tensor([0.0, 1.0, 3.0, 64.0])
    got = class_momentum(0.2, counts, None, None)
    want = torch.tensor([1.0 - 0.8 ** n for n in (0, 1, 3, 64)], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    seen = torch.tensor([0.0, 5.0, 2.0, 100.0])
    got = class_momentum(0.01, counts, seen, 16.0)
    for k in range(4):   # per class, the warm-up's closed form at that class's own count
        want_k = warm_momentum(0.01, int(counts[k]), float(seen[k]), 16.0)
        assert float(got[k]) == pytest.approx(float(want_k), abs=1e-12)
    assert float(got[0]) == 0.0


def _layer(balanced: float | None = 1.0, prior=None, momentum=0.05, form="mixture", confidence=None
           ) -> tuple[nn.Module, StreamNormStats]:
    torch.manual_seed(3)
    bn = nn.BatchNorm2d(2).eval()
    model = nn.Sequential(bn)
    return model, StreamNormStats(model, "ema", momentum=momentum, prior_images=prior, balanced=balanced,
                                  num_classes=2, balanced_form=form, confidence=confidence)


def _class_images(k: int, n: int, seed: int) -> torch.Tensor:
    """Class 0 centred at -2, class 1 at +2 (per channel), unit spread."""
    return torch.randn(n, 2, 3, 3, generator=torch.Generator().manual_seed(seed)) + (4.0 * k - 2.0)


def _feed(model, norm, stats, chunks):
    for x, y in chunks:
        with torch.no_grad(), norm.use(stats, x.shape[0], labels=y) as upd:
            model(x)
        stats = {**stats, **upd}
    return stats


def test_a_label_shifted_stream_does_not_move_the_balanced_statistics_to_its_class_mix():
    model, norm = _layer(momentum=0.05)
    both = [(torch.cat([_class_images(0, 8, i), _class_images(1, 8, 100 + i)]),
             torch.tensor([0] * 8 + [1] * 8)) for i in range(30)]
    stats = _feed(model, norm, norm.init_state(), both)
    bal0, _ = balanced_moments(stats["0.cmean"], stats["0.cvar"])
    only0 = [(_class_images(0, 8, 500 + i), torch.zeros(8, dtype=torch.long)) for i in range(30)]
    after = _feed(model, norm, stats, only0)
    # the global EMA follows the class mix (to about -2); the balanced mean stays between the classes (about 0)
    assert float(after["0.mean"].mean()) < -1.5
    bal1, _ = balanced_moments(after["0.cmean"], after["0.cvar"])
    assert float((bal1 - bal0).abs().max()) < 0.2 and float(bal1.abs().max()) < 0.3
    torch.testing.assert_close(after["0.cmean"][1], stats["0.cmean"][1], rtol=0, atol=0)   # class 1 unseen: kept
    # and the layer normalises class-0 images with the balanced statistics (lambda 1): their output is about -1
    x = _class_images(0, 8, 999)
    with torch.no_grad(), norm.use(after, 8, update=False):
        out = model(x)
    b_mean, b_var = balanced_moments(after["0.cmean"], after["0.cvar"])
    want = (x - b_mean.view(1, -1, 1, 1)) / torch.sqrt(b_var.view(1, -1, 1, 1) + 1e-5) * model[0].weight.view(
        1, -1, 1, 1) + model[0].bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def _normalised_with(model, norm, stats, x) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, var) the layer normalised ``x`` with (stats read, not moved), from its output."""
    bn = model[0]
    with torch.no_grad(), norm.use(stats, x.shape[0], update=False):
        out = model(x)
        z = (out - bn.bias.view(1, -1, 1, 1)) / bn.weight.view(1, -1, 1, 1)  # (x - mean) / sqrt(var + eps)
        a, b = x[:, :, 0, 0], z[:, :, 0, 0]
        c, d = x[:, :, 1, 1], z[:, :, 1, 1]
        scale = ((a - c) / (b - d))[0]                                         # sqrt(var + eps)
    return (a - b * scale)[0], scale.square() - bn.eps


def test_correction_leaves_a_balanced_stream_as_it_is_and_undoes_a_label_shift():
    model, corr = _layer(momentum=0.05, form="correction")
    model0, plain = _layer(balanced=None, momentum=0.05)
    assert corr.init_state()["0.cmix"].tolist() == [0.5, 0.5]
    both = [(torch.cat([_class_images(0, 4, i), _class_images(1, 4, 100 + i)]),
             torch.tensor([0] * 4 + [1] * 4)) for i in range(30)]
    st = _feed(model, corr, corr.init_state(), both)
    st0 = _feed(model0, plain, plain.init_state(), both)
    torch.testing.assert_close(st["0.cmix"], torch.tensor([0.5, 0.5]), rtol=0, atol=1e-6)
    x = _class_images(0, 2, 7)
    # a stream whose recent class mix is uniform: the correction is (about) nothing, the plain statistics
    for got, want in zip(_normalised_with(model, corr, st, x), _normalised_with(model0, plain, st0, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    only0 = [(_class_images(0, 8, 500 + i), torch.zeros(8, dtype=torch.long)) for i in range(30)]
    after, after0 = _feed(model, corr, st, only0), _feed(model0, plain, st0, only0)
    assert float(after["0.cmix"][0]) > 0.99
    mean0, _ = _normalised_with(model0, plain, after0, x)
    mean, var = _normalised_with(model, corr, after, x)
    assert float(mean0.mean()) < -1.5                 # the plain statistics follow the class mix to class 0's
    assert float(mean.abs().max()) < 0.3              # corrected: back between the classes
    b_mean, b_var = balanced_moments(after["0.cmean"], after["0.cvar"])
    torch.testing.assert_close(mean, b_mean, rtol=0.05, atol=0.05)
    torch.testing.assert_close(var, b_var, rtol=0.05, atol=0.05)


def test_lambda_merges_the_balanced_and_global_statistics_as_two_populations():
    model, half = _layer(balanced=0.5)
    x, y = _class_images(0, 4, 1), torch.zeros(4, dtype=torch.long)
    stats = half.init_state()
    with torch.no_grad(), half.use(stats, 4, labels=y):
        out = model(x)
    model1, full = _layer(balanced=1.0)
    model0, none = _layer(balanced=None)
    st1, st0 = full.init_state(), none.init_state()
    with torch.no_grad(), full.use(st1, 4, labels=y) as u1:
        model1(x)
    with torch.no_grad(), none.use(st0, 4) as u0:
        model0(x)
    bm, bv = balanced_moments(u1["0.cmean"], u1["0.cvar"])
    gm, gv = u0["0.mean"], u0["0.var"]
    mean = 0.5 * gm + 0.5 * bm
    var = 0.5 * gv + 0.5 * bv + 0.25 * (bm - gm).pow(2)
    bn = model[0]
    want = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(
        1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_one_request_of_n_images_moves_the_class_statistics_as_n_one_image_requests():
    # as for the global statistics: the same weight, exactly the same mixture when each class's images are alike
    # (an EMA over different images weighs the later ones more; a request weighs its images equally)
    model, norm = _layer(momentum=0.2, prior=4.0)
    look = [_class_images(0, 1, 0), _class_images(1, 1, 1)]
    xs = torch.cat([look[i % 2] for i in range(9)])
    ys = torch.tensor([i % 2 for i in range(9)])
    one = _feed(model, norm, norm.init_state(), [(xs, ys)])
    many = _feed(model, norm, norm.init_state(), [(xs[i:i + 1], ys[i:i + 1]) for i in range(9)])
    for k in ("0.cmean", "0.cvar", "cseen", "seen"):
        torch.testing.assert_close(one[k], many[k], rtol=1e-5, atol=1e-5, msg=k)
    assert one["cseen"].tolist() == [5.0, 4.0]


def test_updating_needs_labels_and_reading_does_not():
    model, norm = _layer()
    stats = norm.init_state()
    with pytest.raises(ValueError, match="pseudo-labels"), norm.use(stats, 2):
        model(_class_images(0, 2, 0))
    with torch.no_grad(), norm.use(stats, 2, update=False) as upd:
        model(_class_images(0, 2, 0))
    assert "0.cmean" not in upd
    with pytest.raises(ValueError, match="bn_balanced"):
        StreamNormStats(model, "ema", balanced=1.5, num_classes=2)
    with pytest.raises(ValueError, match="bn_balanced"):
        StreamNormStats(model, "ema", balanced=0.5, num_classes=1)
    with pytest.raises(ValueError, match="bn_balanced_form"):
        StreamNormStats(model, "ema", balanced=0.5, num_classes=2, balanced_form="median")


def test_the_engine_updates_the_classes_its_pre_pass_predicts():
    eng = _engine("eata", **BAL)
    assert eng.balanced and eng.describe()["bn_balanced"] == 1.0
    st = eng.new_state()
    for i in range(3):
        eng.step(st, _images(4, i))
    before = {k: v.clone() for k, v in st.tensors.items()}
    x = _images(6, 42)
    predicted = set(eng.predict(st, x).argmax(1).tolist())      # the pre-pass: the stream's statistics as they are
    eng.step(st, x)
    key = next(k for k in st.tensors if k.endswith(".cmean"))
    moved = {k for k in range(10) if not torch.equal(st.tensors[key][k], before[key][k])}
    assert moved == predicted
    assert st.tensors["norm.cseen"].sum() == 18.0
    cnt = torch.bincount(torch.tensor(sorted(predicted)), minlength=10) > 0
    assert torch.equal((st.tensors["norm.cseen"] != before["norm.cseen"]), cnt)


def test_balanced_state_resets_snapshots_counts_its_bytes_and_is_fingerprinted(tmp_path):
    guard = GuardConfig(enabled=True, warmup_images=2, warmup_checks=1, max_entropy=1.01, max_class_share=1.01)
    eng = _engine("eata", guard=guard, **BAL)
    plain = _engine("eata", guard=guard, **{**BAL, "bn_balanced": None})
    fresh, st = eng.new_state(seed=3), eng.new_state(seed=3)
    channels = sum(v.numel() for k, v in plain.new_state().tensors.items() if k.endswith(".mean"))
    assert st.nbytes() == plain.new_state().nbytes() + 2 * 10 * channels * 4 + 10 * 8   # cmean, cvar, cseen
    for i, n in enumerate([1, 2, 1, 3]):
        eng.step(st, _images(n, 10 + i))
    assert float(st.tensors["norm.cseen"].sum()) == 7.0
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)
    assert eng.fingerprint["bn_balanced"] == 1.0 and "bn_balanced" not in plain.fingerprint
    with pytest.raises(Exception, match="bn_balanced"):
        plain.load_state(tmp_path / "s.safetensors")
    plain.new_state().save(tmp_path / "p.safetensors")
    with pytest.raises(Exception, match="bn_balanced"):
        eng.load_state(tmp_path / "p.safetensors")
    other = _engine("eata", guard=guard, **{**BAL, "bn_balanced": 0.5})
    with pytest.raises(Exception, match="bn_balanced"):
        other.load_state(tmp_path / "s.safetensors")
    corr = _engine("eata", guard=guard, **{**BAL, "bn_balanced_form": "correction"})
    with pytest.raises(Exception, match="bn_balanced_form"):
        corr.load_state(tmp_path / "s.safetensors")
    layers = sum(1 for k in plain.new_state().tensors if k.endswith(".mean"))
    assert corr.new_state().nbytes() == eng.new_state().nbytes() + layers * 10 * 4      # the class mix per layer
    cs, cfresh = corr.new_state(seed=1), corr.new_state(seed=1)
    for i, n in enumerate([1, 3]):
        corr.step(cs, _images(n, 20 + i))
    _restore_and_continue(corr, cs, tmp_path)
    corr.reset(cs)
    _same(cs.tensors, cfresh.tensors)


def test_a_fallback_restores_the_class_statistics_and_a_release_restarts_their_warm_up():
    from mgg_core.engine import StepResult
    from mgg_core.reasons import RollbackReason

    eng = _engine("eata", guard=GuardConfig(enabled=True, hold_images=8, max_entropy=1.01, max_class_share=1.01),
                  **BAL)
    st, fresh = eng.new_state(), eng.new_state()
    for i in range(3):
        eng.step(st, _images(4, i))
    key = next(k for k in st.tensors if k.endswith(".cmean"))
    assert not torch.equal(st.tensors[key], fresh.tensors[key])
    res = StepResult(logits=torch.zeros(1, 10), adapted=False, skipped_reason=None, loss=None, batch_entropy=0.0,
                     sample_entropy=torch.zeros(1), n_selected=0, step=0)
    eng._fall_back(st, RollbackReason.SOURCE_DISAGREEMENT, res)
    assert torch.equal(st.tensors[key], fresh.tensors[key]) and float(st.tensors["norm.cseen"].sum()) == 0.0
    eng.step(st, _images(4, 7))                                      # held at source: nothing moves
    assert torch.equal(st.tensors[key], fresh.tensors[key])
    st.tensors["norm.cseen"] += 50.0
    eng._restart_warmup(st)
    assert float(st.tensors["norm.cseen"].abs().sum()) == 0.0


def test_interleaved_streams_of_small_requests_equal_the_streams_alone_and_one_image_works():
    eng = _engine("eata", **BAL)
    _interleaved_equal_alone_and_one_image_fused(eng, {0: [1, 3, 1, 2, 1], 1: [2, 1, 1, 4, 1]})
    assert eng.fused_forwards["segment"] > 0


def _interleaved_equal_alone_and_one_image_fused(eng, sizes: dict[int, list[int]]) -> None:
    """Two streams of small requests (``sizes``: request sizes per stream seed) interleaved equal the same streams
    alone, bit for bit; three 1-image requests fused equal the separate steps (the fused tests' tolerance)."""
    alone = {}
    for s, ns in sizes.items():
        st = eng.new_state(seed=s)
        alone[s] = ([eng.step(st, _images(n, 100 * s + i)).logits for i, n in enumerate(ns)], st)
    inter = {s: eng.new_state(seed=s) for s in sizes}
    logits: dict[int, list] = {s: [] for s in sizes}
    for i in range(len(sizes[0])):
        for s in sorted(sizes, reverse=True):
            logits[s].append(eng.step(inter[s], _images(sizes[s][i], 100 * s + i)).logits)
    for s in sizes:
        assert all(torch.equal(a, b) for a, b in zip(alone[s][0], logits[s], strict=True))
        _same(alone[s][1].tensors, inter[s].tensors)
    a, b = [eng.new_state(seed=s) for s in range(3)], [eng.new_state(seed=s) for s in range(3)]
    xs = [_images(1, 900 + s) for s in range(3)]
    fused = eng.step_many(list(zip(a, xs, strict=True)))
    single = [eng.step(st, x) for st, x in zip(b, xs, strict=True)]
    for r, q in zip(fused, single, strict=True):
        torch.testing.assert_close(r.logits, q.logits, rtol=1e-5, atol=1e-5)


def test_bn_balanced_is_a_validated_service_setting_that_reaches_the_engine(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    assert ServiceSettings(_env_file=None).bn_balanced is None                # off by default
    for bad in (0.0, -0.5, 1.01):
        with pytest.raises(ValidationError, match="bn_balanced"):
            ServiceSettings(_env_file=None, bn_balanced=bad)
    assert ServiceSettings(_env_file=None, bn_balanced=1.0).bn_balanced == 1.0
    default = AdaptationEngine(_resnet(), engine_config(ServiceSettings(_env_file=None), build_method("eata", 10),
                                                        "cpu", None), num_classes=10)
    assert not default.balanced and "bn_balanced" not in default.fingerprint
    assert default.describe()["bn_balanced"] is None and default.describe()["bn_balanced_form"] is None
    with pytest.raises(ValidationError, match="bn_balanced_form"):
        ServiceSettings(_env_file=None, bn_balanced_form="median")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED", "0.5")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED_FORM", "correction")
    cfg = engine_config(ServiceSettings(_env_file=None), build_method("eata", 10), "cpu", None)
    assert cfg.bn_balanced == 0.5 and cfg.bn_balanced_form == "correction"
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.norm.balanced == 0.5 and eng.describe()["bn_balanced"] == 0.5
    assert eng.fingerprint["bn_balanced"] == 0.5 and eng.fingerprint["bn_balanced_form"] == "correction"
    assert eng.describe()["bn_balanced_form"] == "correction" and eng.norm.form.tracks_mix


# ---------------------------------------------------------------- the confidence gate (bn_balanced_confidence)
def test_unconfident_images_get_no_class_and_leave_the_class_statistics_untouched():
    model, gated = _layer(momentum=0.05, form="correction", prior=4.0, confidence=0.9)
    logits = torch.tensor([[3.0, 0.0], [0.2, 0.0], [0.0, 5.0]])        # max softmax 0.953, 0.550, 0.993
    assert gated.pseudo_labels(logits).tolist() == [0, -1, 1]
    assert _layer(form="correction")[1].pseudo_labels(logits).tolist() == [0, 0, 1]      # no gate: the argmax
    st = gated.init_state()
    after = _feed(model, gated, st, [(_class_images(0, 6, 1), torch.full((6,), -1))])
    for k in ("0.cmean", "0.cvar", "cseen"):                             # no class statistic or count moves
        torch.testing.assert_close(after[k], st[k], rtol=0, atol=0, msg=k)
    assert float(after["seen"]) == 6.0 and not torch.equal(after["0.mean"], st["0.mean"])   # the global ones do
    keep = 1.0 - float(warm_momentum(0.05, 6, 0.0, 4.0))                  # the mix decays: its confident share
    torch.testing.assert_close(after["0.cmix"], torch.full((2,), 0.5 * keep), rtol=1e-6, atol=0)
    # a mixed request moves each class's statistics as a request of its confident images alone would
    model2, plain = _layer(momentum=0.05, form="correction", prior=4.0)
    x = torch.cat([_class_images(0, 1, 2), _class_images(0, 1, 3), _class_images(1, 1, 4), _class_images(1, 1, 5)])
    mixed = _feed(model, gated, gated.init_state(), [(x, torch.tensor([0, -1, 1, -1]))])
    alone = _feed(model2, plain, plain.init_state(), [(x[[0, 2]], torch.tensor([0, 1]))])
    for k in ("0.cmean", "0.cvar", "cseen"):
        torch.testing.assert_close(mixed[k], alone[k], rtol=1e-6, atol=1e-6, msg=k)
    m4 = float(warm_momentum(0.05, 4, 0.0, 4.0))                          # the mix: 2 of the 4 images, one each
    torch.testing.assert_close(mixed["0.cmix"], torch.full((2,), (1 - m4) * 0.5 + m4 * 0.25), rtol=1e-6, atol=0)


def test_the_gated_correction_uses_the_normalised_mix_at_lambda_times_the_confident_share():
    gen = torch.Generator().manual_seed(1)
    gmean, gvar = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 1.0
    cmean, cvar = torch.randn(4, 3, generator=gen), torch.rand(4, 3, generator=gen) + 0.5
    mix = torch.tensor([0.3, 0.1, 0.0, 0.0])                              # confident share 0.4
    mean, var = correction_form(gmean, gvar, cmean, cvar, mix, 0.8, gated=True)
    want_mean, want_var = correction_form(gmean, gvar, cmean, cvar, mix / 0.4, 0.8 * 0.4)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(var, want_var)
    b_mean, _ = balanced_moments(cmean, cvar)
    torch.testing.assert_close(mean, gmean + 0.32 * (b_mean - (0.75 * cmean[0] + 0.25 * cmean[1])))
    # nothing confident lately: the stream's own statistics, exactly
    mean0, var0 = correction_form(gmean, gvar, cmean, cvar, torch.zeros(4), 1.0, gated=True)
    assert torch.equal(mean0, gmean) and torch.equal(var0, torch.maximum(gvar, CORRECTION_VAR_FLOOR * gvar))


def _gate_adds_no_state_restores_and_resets(eng: AdaptationEngine, plain: AdaptationEngine, tmp_path) -> None:
    """A gated engine's stream takes as many bytes as the ungated one's (no new state: the class mix sums to the
    gated share rho), survives snapshot -> restore -> continue bit-identically, and resets exactly."""
    fresh, st = eng.new_state(seed=3), eng.new_state(seed=3)
    assert st.nbytes() == plain.new_state().nbytes()
    for i, n in enumerate([1, 2, 1, 3]):
        eng.step(st, _images(n, 10 + i))
    _restore_and_continue(eng, st, tmp_path)
    eng.reset(st)
    _same(st.tensors, fresh.tensors)


def _refuse_each_others_snapshots(pairs: list[tuple[AdaptationEngine, AdaptationEngine, str]], tmp_path) -> None:
    """For each (a, b, key): a snapshot of engine ``a`` is refused by engine ``b``, naming the setting ``key``."""
    for a, b, key in pairs:
        a.new_state().save(tmp_path / "x.safetensors")
        with pytest.raises(Exception, match=key):
            b.load_state(tmp_path / "x.safetensors")


def _gated_engines():
    """A correction engine without the gate and one whose tau splits its first pre-pass (tiny random ResNet)."""
    corr = {**BAL, "bn_balanced_form": "correction"}
    plain = _engine("eata", **corr)
    x = _images(8, 42)
    conf = plain.predict(plain.new_state(), x).softmax(1).amax(1)
    tau = float(conf.sort().values[3:5].mean())                           # half the images confident
    return plain, _engine("eata", **corr, bn_balanced_confidence=tau), x, conf, tau


def test_the_gated_engine_counts_only_confident_pre_pass_labels():
    plain, eng, x, conf, tau = _gated_engines()
    assert eng.describe()["bn_balanced_confidence"] == tau and plain.describe()["bn_balanced_confidence"] is None
    st = eng.new_state()
    labels = plain.predict(plain.new_state(), x).argmax(1)
    eng.step(st, x)
    sure = conf >= tau
    assert 0 < int(sure.sum()) < 8
    want = torch.bincount(labels[sure], minlength=10).to(torch.float64)
    assert torch.equal(st.tensors["norm.cseen"], want)                     # only the confident images, by class
    assert float(st.tensors["norm.seen"]) == 8.0
    mixes = [v for k, v in st.tensors.items() if k.endswith(".cmix")]
    assert all(float(v.sum()) < 0.999 for v in mixes)                      # the mix counts the same images
    pst = plain.new_state()
    plain.step(pst, x)
    assert float(pst.tensors["norm.cseen"].sum()) == 8.0


def test_gated_state_resets_snapshots_is_fingerprinted_and_interleaves(tmp_path):
    plain, eng, _, _, tau = _gated_engines()
    _gate_adds_no_state_restores_and_resets(eng, plain, tmp_path)
    assert eng.fingerprint["bn_balanced_confidence"] == tau and "bn_balanced_confidence" not in plain.fingerprint
    _refuse_each_others_snapshots([(plain, eng, "bn_balanced_confidence"), (eng, plain, "bn_balanced_confidence")],
                                  tmp_path)
    other = _engine("eata", **{**BAL, "bn_balanced_form": "correction", "bn_balanced_confidence": tau / 2})
    with pytest.raises(Exception, match="bn_balanced_confidence"):
        other.load_state(tmp_path / "x.safetensors")
    _interleaved_equal_alone_and_one_image_fused(eng, {0: [1, 3, 1, 2], 1: [2, 1, 4, 1]})


def test_bn_balanced_confidence_is_a_validated_setting_that_needs_bn_balanced(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    assert ServiceSettings(_env_file=None).bn_balanced_confidence is None               # off by default
    for bad in (0.0, -0.1, 1.0, 1.5):
        with pytest.raises(ValidationError, match="bn_balanced_confidence"):
            ServiceSettings(_env_file=None, bn_balanced=1.0, bn_balanced_confidence=bad)
    with pytest.raises(ValidationError, match="bn_balanced_confidence needs bn_balanced"):
        ServiceSettings(_env_file=None, bn_balanced_confidence=0.9)
    model = nn.Sequential(nn.BatchNorm2d(2).eval())
    for bad, bal in ((1.0, 1.0), (0.0, 1.0), (0.9, None)):
        with pytest.raises(ValueError, match="bn_balanced_confidence"):
            StreamNormStats(model, "ema", balanced=bal, num_classes=2, confidence=bad)
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED", "1.0")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED_FORM", "correction")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED_CONFIDENCE", "0.9")
    cfg = engine_config(ServiceSettings(_env_file=None), build_method("eata", 10), "cpu", None)
    assert cfg.bn_balanced_confidence == 0.9
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.norm.confidence == 0.9 and eng.describe()["bn_balanced_confidence"] == 0.9
    assert eng.fingerprint["bn_balanced_confidence"] == 0.9


# ---------------------------------------------------------------- the agreement gate and the share fade (session 9)
def test_labels_that_disagree_with_the_source_get_no_class_and_agreement_combines_with_confidence():
    model = nn.Sequential(nn.BatchNorm2d(2).eval())
    agree = StreamNormStats(model, "ema", balanced=1.0, num_classes=2, balanced_form="correction", agree=True)
    both = StreamNormStats(model, "ema", balanced=1.0, num_classes=2, balanced_form="correction", agree=True,
                           confidence=0.9)
    logits = torch.tensor([[3.0, 0.0], [0.2, 0.0], [0.0, 5.0], [4.0, 0.0]])    # max softmax 0.953 0.550 0.993 0.982
    source = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])    # source labels 0 0 0 1
    assert agree.gated and agree.pseudo_labels(logits, source).tolist() == [0, 0, -1, -1]
    assert both.pseudo_labels(logits, source).tolist() == [0, -1, -1, -1]
    with pytest.raises(ValueError, match="source model's logits"):
        agree.pseudo_labels(logits)
    with pytest.raises(ValueError, match="source model's logits"):
        agree.pseudo_labels(logits, source[:2])
    # stacked streams (S, n, K), as the fused pre-pass labels them
    assert agree.pseudo_labels(logits.expand(2, -1, -1), source.expand(2, -1, -1)).tolist() == [[0, 0, -1, -1]] * 2


def test_the_share_fade_switches_the_correction_off_up_to_s0_and_full_on_from_twice_it():
    gen = torch.Generator().manual_seed(2)
    gmean, gvar = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 1.0
    cmean, cvar = torch.randn(4, 3, generator=gen), torch.rand(4, 3, generator=gen) + 0.5
    unit = torch.tensor([0.6, 0.2, 0.2, 0.0])
    floor = torch.maximum(gvar, CORRECTION_VAR_FLOOR * gvar)
    for rho, weight in ((0.1, 0.0), (0.25, 0.0), (0.375, 0.5), (0.5, 1.0), (0.9, 1.0)):
        assert float(share_weight(torch.tensor(rho), 0.25)) == pytest.approx(weight)
        mean, var = correction_form(gmean, gvar, cmean, cvar, unit * rho, 0.8, gated=True, share=0.25)
        want_mean, want_var = correction_form(gmean, gvar, cmean, cvar, unit, 0.8 * weight)
        torch.testing.assert_close(mean, want_mean)
        torch.testing.assert_close(var, want_var)
        if weight == 0.0:                                   # at or below s0: the stream's own statistics, exactly
            assert torch.equal(mean, gmean) and torch.equal(var, floor)
    assert float(share_weight(torch.tensor(0.3), None)) == pytest.approx(0.3)   # no fade: lambda x rho as before
    # the layer's share per stream: (S, K) mixes give one weight per row
    mix = torch.stack([unit * 0.2, unit * 0.45])
    mean, _ = correction_form(gmean.expand(2, -1), gvar.expand(2, -1), cmean.expand(2, -1, -1),
                              cvar.expand(2, -1, -1), mix, 1.0, gated=True, share=0.25)
    assert torch.equal(mean[0], gmean)
    torch.testing.assert_close(mean[1], correction_form(gmean, gvar, cmean, cvar, unit, 0.8)[0])


AGREE = {**BAL, "bn_balanced_form": "correction", "bn_balanced_agree": True}


def _diverged(eng, seed: int = 5):
    """A stream of ``eng`` whose adapted scalars were moved (noise on theta) so its pre-pass labels partly disagree
    with the source's on ``_images(8, 42)``."""
    st = eng.new_state()
    st.tensors["theta"] = st.tensors["theta"] + 0.5 * torch.randn(st.theta.shape,
                                                                  generator=torch.Generator().manual_seed(seed))
    return st, _images(8, 42)


def test_the_agreeing_engine_counts_exactly_the_labels_the_source_agrees_with_in_one_source_forward():
    eng = _engine("eata", guard=GuardConfig(enabled=True, check_share=0.5), **AGREE)
    assert eng.describe()["bn_balanced_agree"] is True and eng.describe()["bn_balanced_share"] is None
    st, x = _diverged(eng)
    labels, source = eng.predict(st, x).argmax(1), eng.source_predict(x).argmax(1)
    agrees = labels == source
    assert 0 < int(agrees.sum()) < 8, agrees
    calls: list[int] = []
    real = eng.source_predict
    eng.source_predict = lambda images: (calls.append(images.shape[0]), real(images))[1]   # type: ignore[method-assign]
    before = st.tensors["norm.cseen"].clone()
    eng.step(st, x)
    want = torch.bincount(labels[agrees], minlength=10).to(torch.float64)
    assert torch.equal(st.tensors["norm.cseen"] - before, want)            # only the agreeing images, by class
    assert calls == [8]                 # one source forward of the whole request; the guard's 4 checks reuse it
    g = eng._group(st, "guard")
    assert float(g["credit"]) < 1.0                                        # the guard did check this request
    # a request held at source runs no pre-pass: no source forward for the gate, the guard's own as before
    st.tensors["guard.hold"] = torch.tensor(100.0, dtype=st.tensors["guard.hold"].dtype)
    calls.clear()
    eng.step(st, x)
    assert calls == [4]


def test_agreeing_state_resets_snapshots_is_fingerprinted_and_interleaves(tmp_path):
    guard = GuardConfig(enabled=True, warmup_images=2, warmup_checks=1, max_entropy=1.01, max_class_share=1.01)
    plain = _engine("eata", guard=guard, **{**AGREE, "bn_balanced_agree": False})
    eng = _engine("eata", guard=guard, **AGREE, bn_balanced_share=0.3)
    assert eng.describe()["bn_balanced_share"] == 0.3 and plain.describe()["bn_balanced_agree"] is False
    _gate_adds_no_state_restores_and_resets(eng, plain, tmp_path)
    assert eng.fingerprint["bn_balanced_agree"] is True and eng.fingerprint["bn_balanced_share"] == 0.3
    assert "bn_balanced_agree" not in plain.fingerprint
    no_fade = _engine("eata", guard=guard, **AGREE)
    _refuse_each_others_snapshots([(plain, eng, "bn_balanced_agree"), (eng, plain, "bn_balanced_agree"),
                                   (eng, no_fade, "bn_balanced_share"), (no_fade, eng, "bn_balanced_share")], tmp_path)
    _interleaved_equal_alone_and_one_image_fused(eng, {0: [1, 3, 1, 2], 1: [2, 1, 4, 1]})


def test_the_fade_leaves_a_stream_with_few_agreeing_labels_on_its_global_statistics():
    """Engine level: with s0 above every layer's agreeing share the stream normalises exactly as one whose class
    statistics were never used (lambda x 0), while its class statistics still move with the agreeing labels."""
    eng = _engine("eata", **AGREE, bn_balanced_share=0.5)
    st, x = _diverged(eng)
    skew = torch.zeros(10)
    skew[:2] = torch.tensor([0.4, 0.1])                                    # recent share 0.5 = s0, skewed to class 0
    for key in [k for k in st.tensors if k.endswith(".cmix")]:
        st.tensors[key] = skew.to(st.tensors[key].dtype)
    faded = eng.predict(st, x)                                             # class statistics still the source's
    for key in [k for k in st.tensors if k.endswith(".cmean")]:            # class offsets that would shift it
        st.tensors[key] = st.tensors[key] + torch.arange(10.0).unsqueeze(1)
    assert torch.equal(eng.predict(st, x), faded)
    no_fade = _engine("eata", **AGREE, bn_balanced_share=0.2)              # 0.5 >= 2 x 0.2: the full correction
    assert not torch.allclose(no_fade.predict(st, x), faded)


def test_bn_balanced_agree_and_share_are_validated_settings_that_reach_the_engine(monkeypatch):
    from pydantic import ValidationError

    from mgg_core.methods import build_method
    from service.runtime import engine_config
    from service.settings import ENV_PREFIX, ServiceSettings

    default = ServiceSettings(_env_file=None)
    assert default.bn_balanced_agree is False and default.bn_balanced_share is None          # off by default
    with pytest.raises(ValidationError, match="bn_balanced_agree needs bn_balanced"):
        ServiceSettings(_env_file=None, bn_balanced_agree=True)
    corr = dict(bn_balanced=1.0, bn_balanced_form="correction")
    for bad in (0.0, -0.1, 0.51, 1.0):
        with pytest.raises(ValidationError, match="bn_balanced_share"):
            ServiceSettings(_env_file=None, **corr, bn_balanced_agree=True, bn_balanced_share=bad)
    for bad_cfg in (corr, dict(bn_balanced=1.0, bn_balanced_agree=True)):       # no gate; the mixture form
        with pytest.raises(ValidationError, match="bn_balanced_share needs"):
            ServiceSettings(_env_file=None, **bad_cfg, bn_balanced_share=0.3)
    assert ServiceSettings(_env_file=None, **corr, bn_balanced_confidence=0.9, bn_balanced_share=0.5).bn_balanced_share
    model = nn.Sequential(nn.BatchNorm2d(2).eval())
    with pytest.raises(ValueError, match="bn_balanced_agree"):
        StreamNormStats(model, "ema", num_classes=2, agree=True)
    for kw in (dict(share=0.6, agree=True), dict(share=0.3), dict(share=0.3, agree=True, balanced_form="mixture")):
        with pytest.raises(ValueError, match="bn_balanced_share"):
            StreamNormStats(model, "ema", balanced=1.0, num_classes=2, **{"balanced_form": "correction", **kw})
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED", "1.0")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED_FORM", "correction")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED_AGREE", "true")
    monkeypatch.setenv(f"{ENV_PREFIX}BN_BALANCED_SHARE", "0.3")
    cfg = engine_config(ServiceSettings(_env_file=None), build_method("eata", 10), "cpu", None)
    assert cfg.bn_balanced_agree is True and cfg.bn_balanced_share == 0.3
    eng = AdaptationEngine(_resnet(), cfg, num_classes=10)
    assert eng.norm.agree and eng.norm.share == 0.3 and eng.describe()["bn_balanced_share"] == 0.3
    assert eng.fingerprint["bn_balanced_agree"] is True and eng.fingerprint["bn_balanced_share"] == 0.3
