"""COME and ROID: their losses, filters and weights against the equations of the papers, and their wiring."""
from __future__ import annotations

import math

import pytest
import torch

from mgg_core.losses import (
    entropy_of_opinion,
    smoothed_prior,
    soft_likelihood_ratio,
    softmax_entropy,
    symmetric_cross_entropy,
)
from mgg_core.methods import METHODS, build_method

torch.manual_seed(0)


def _opinion_entropy_by_the_paper(z: torch.Tensor, k: float) -> torch.Tensor:
    """COME Eq.: evidence e = exp(z), S = sum e + K, b = e / S, u = K / S, H = -sum b ln b - u ln u."""
    out = []
    for row in z.double():
        e = torch.exp(row)
        s = e.sum() + k
        b, u = e / s, k / s
        out.append(-(b * b.log()).sum() - u * math.log(u))
    return torch.stack(out)


def test_entropy_of_opinion_matches_the_equation():
    z = torch.randn(7, 10) * 3
    for k in (10.0, 1000.0, 2.5):
        assert torch.allclose(entropy_of_opinion(z, k).double(), _opinion_entropy_by_the_paper(z, k), atol=1e-5)
    # default K = C
    assert torch.allclose(entropy_of_opinion(z), entropy_of_opinion(z, 10.0))
    # the reference implementation's form (with its 1e-7) agrees to < 1e-5
    e = torch.exp(z.double())
    prob = torch.cat([e / (e.sum(1, keepdim=True) + 10), 10 / (e.sum(1, keepdim=True) + 10)], 1) + 1e-7
    assert torch.allclose(entropy_of_opinion(z, 10.0).double(), -(prob * prob.log()).sum(1), atol=1e-5)
    # no overflow where exp(z) would overflow in float32
    big = torch.tensor([[200.0, 0.0, -5.0]])
    assert torch.isfinite(entropy_of_opinion(big)).all()


def test_entropy_of_opinion_bounds_the_logit_norm():
    """The conservative bound: the gradient has no component along z (a step cannot inflate ||z||),
    unlike plain entropy, whose gradient lengthens the logits of a confident sample."""
    z = (torch.randn(5, 10) * 2).requires_grad_(True)
    (g,) = torch.autograd.grad(entropy_of_opinion(z).sum(), z)
    assert torch.allclose((g * z).sum(1), torch.zeros(5), atol=1e-5)
    (g_ent,) = torch.autograd.grad(softmax_entropy(z).sum(), z)
    assert (g_ent * z).sum(1).abs().max() > 1e-3
    # zero logits, C = K = 4: e = 1, S = 8, b = 1/8 (x4), u = 1/2 -> H = 4/8 ln 8 + 1/2 ln 2 = 2 ln 2
    assert entropy_of_opinion(torch.zeros(1, 4), 4.0).item() == pytest.approx(2 * math.log(2), abs=1e-6)


def test_soft_likelihood_ratio_matches_the_equation():
    z = torch.randn(6, 10) * 4
    p = z.softmax(1).double().clamp(max=0.99)
    ref = -(p * torch.log(p / (1 - p) + 1e-5)).sum(1)
    assert torch.allclose(soft_likelihood_ratio(z).double(), ref, atol=1e-6)
    # the likelihood ratio keeps a large gradient for a confident prediction, where entropy's fades
    sharp = torch.tensor([[4.0, 0.0, 0.0]], requires_grad=True)
    (g,) = torch.autograd.grad(soft_likelihood_ratio(sharp).sum(), sharp)
    (g_ent,) = torch.autograd.grad(softmax_entropy(sharp).sum(), sharp)
    assert g.norm() > 5 * g_ent.norm()


def test_symmetric_cross_entropy_and_prior():
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    ce = lambda x, y: -(y.softmax(1) * x.log_softmax(1)).sum(1)  # noqa: E731
    assert torch.allclose(symmetric_cross_entropy(a, b), 0.5 * ce(a, b) + 0.5 * ce(b, a))
    assert torch.allclose(symmetric_cross_entropy(a, b, alpha=0.0), ce(a, b))
    probs = torch.randn(16, 10).softmax(1)
    pi = probs.mean(0)
    s = max(1 / 16, 1 / 10) / pi.max()
    prior = smoothed_prior(probs)
    assert torch.allclose(prior, (pi + s) / (1 + s * 10))
    assert float(prior.sum()) == pytest.approx(1.0, abs=1e-6)
    # pulled towards uniform, order kept
    assert float(prior.max() - prior.min()) < float(pi.max() - pi.min())
    assert torch.equal(prior.argsort(), pi.argsort())


def test_roid_weights_match_the_paper():
    from mgg_core.methods.roid import roid_weights

    probs = torch.randn(12, 10).mul(2).softmax(1)
    ema = torch.randn(10).softmax(0)
    w, keep = roid_weights(probs, ema, 1 / 3)
    div = 1 - torch.nn.functional.cosine_similarity(ema[None], probs, dim=1)
    div = (div - div.min()) / (div.max() - div.min())
    cert = -softmax_entropy(probs.log())
    cert = (cert - cert.min()) / (cert.max() - cert.min())
    ref = torch.exp(div * cert * 3)
    ref[div < div.mean()] = 0
    assert torch.equal(keep, div >= div.mean())
    assert torch.allclose(w, ref, atol=1e-5)
    assert 0 < int(keep.sum()) < 12
    # a batch of identical predictions: no division by zero, everything kept with weight 1
    w1, k1 = roid_weights(probs[:1].repeat(4, 1), ema, 1 / 3)
    assert torch.equal(k1, torch.ones(4, dtype=torch.bool)) and torch.allclose(w1, torch.ones(4))


def test_registered_with_hparams():
    assert {"come", "roid"} <= set(METHODS)
    come = build_method("come", 10)
    assert come.hparams() == {"num_classes": 10, "prior_mass": None, "e_margin": None}
    roid = build_method("roid", 10, momentum_src=0.9)
    theta, theta0 = torch.ones(3), torch.zeros(3)
    assert torch.allclose(roid.post_update(theta, theta0), torch.full((3,), 0.9))
    with pytest.raises(ValueError, match="no hyper-parameter"):
        build_method("roid", 10, lam=1)


def test_roid_prior_correction_is_a_distribution():
    roid = build_method("roid", 10)
    logits = torch.randn(8, 10)
    out = roid.predictions(logits)
    assert torch.allclose(out.exp().sum(1), torch.ones(8), atol=1e-5)
    probs = logits.softmax(1)
    ref = probs * smoothed_prior(probs)
    assert torch.allclose(out.exp(), ref / ref.sum(1, keepdim=True), atol=1e-6)
    assert torch.equal(build_method("roid", 10, prior_correction=False).predictions(logits), logits)


def test_random_affine_is_seeded_and_keeps_shape():
    from mgg_core.methods.roid import random_affine

    x = torch.randn(4, 3, 32, 32)
    a = random_affine(x, torch.Generator().manual_seed(1))
    b = random_affine(x, torch.Generator().manual_seed(1))
    c = random_affine(x, torch.Generator().manual_seed(2))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, c)
    ident = random_affine(x, None, degrees=0, translate=0, scale=(1, 1))
    assert torch.allclose(ident, x, atol=1e-4)


# ------------------------------------------------------------------------------------------------ in the engine
def _vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4).eval()


def _engine(method: str, optimizer: str = "sgd", lr: float = 0.05, **kw):
    from mgg_core.engine import AdaptationEngine, EngineConfig
    from mgg_core.mgg import GradientMemoryLayer
    from mgg_core.optim import MGG

    opt = MGG(GradientMemoryLayer(seed=0), lr=lr) if optimizer == "mgg" else None
    cfg = EngineConfig(method=method, optimizer=None if optimizer == "mgg" else optimizer, lr=lr, method_kwargs=kw)
    return AdaptationEngine(_vit(), cfg, num_classes=10, optimizer=opt)


def test_roid_step_in_the_engine_is_sgd_then_weight_ensembling():
    eng = _engine("roid", lr=0.05)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    state = eng.new_state(seed=3)
    # the gradient the method hands the optimizer, recomputed with the same per-step generator
    from mgg_core.methods.base import StepContext, Timer

    gen = torch.Generator().manual_seed((3 * 1_000_003 + 0) % (2 ** 63))
    ctx = StepContext(x=x, theta=state.theta, theta0=eng.theta0, state=state.group("method"), forward=eng._forward,
                      timer=Timer(), generator=gen)
    out = eng.method.gradient(ctx)
    res = eng.step(state, x)
    assert res.adapted and 0 < res.n_selected <= 8
    expected = 0.99 * (eng.theta0 - 0.05 * out.grad) + 0.01 * eng.theta0   # first SGD step: buffer = g
    assert torch.allclose(state.theta, expected, atol=1e-6)
    # the returned predictions are the prior-corrected ones of the pre-update forward
    with torch.no_grad():
        raw = eng._forward(eng.theta0, x)[0]
    assert torch.allclose(res.logits, eng.method.predictions(raw), atol=1e-5)
    # the EMA of mean predictions moved from uniform
    assert not torch.allclose(state.tensors["method.probs_ema"], torch.full((10,), 0.1))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "mgg"])
@pytest.mark.parametrize("method", ["come", "roid"])
def test_any_optimizer_drives_come_and_roid(method, optimizer):
    eng = _engine(method, optimizer, lr=1e-2)
    state = eng.new_state()
    gen = torch.Generator().manual_seed(1)
    taken = sum(eng.step(state, torch.randn(8, 3, 32, 32, generator=gen)).adapted for _ in range(3))
    assert taken == 3 and not torch.equal(state.theta, eng.theta0)
    eng.reset(state)
    assert torch.equal(state.theta, eng.theta0)


def test_come_lowers_the_opinion_entropy_on_a_batch():
    eng = _engine("come", "sgd", lr=0.05)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    state = eng.new_state()
    with torch.no_grad():
        before = float(entropy_of_opinion(eng._forward(state.theta, x)[0]).mean())
    for _ in range(5):
        eng.step(state, x)
    with torch.no_grad():
        after = float(entropy_of_opinion(eng._forward(state.theta, x)[0]).mean())
    assert after < before
