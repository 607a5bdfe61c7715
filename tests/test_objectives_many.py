"""``Method.objective_many`` (the engine's fused pass) against ``Method.objective`` per stream, for every fusable
method: losses, which streams have one, selected counts, state updates and the gradient of the summed losses with
respect to the stacked parameters (row s only from stream s)."""
from __future__ import annotations

import math

import pytest
import torch

from mgg_core.methods import METHODS, Method, Objectives, StepContext, Timer, build_method

C, NUMEL, ROWS, N = 10, 24, 6, 4
FUSABLE = [cls.name for cls in METHODS.values() if cls.needs_grad and cls.fusable]


def _no_forward(*args, **kwargs):
    raise AssertionError("objective ran a forward pass")


def _setup(name: str, seed: int, **kw):
    gen = torch.Generator().manual_seed(seed)
    method: Method = build_method(name, C, **kw)
    theta0 = torch.randn(NUMEL, generator=gen)
    if hasattr(method, "fisher"):
        method.fisher = torch.rand(NUMEL, generator=gen)
    stats = {"mean": torch.randn(8, generator=gen), "std": torch.rand(8, generator=gen) + 0.5}
    thetas = (theta0 + 0.1 * torch.randn(ROWS, NUMEL, generator=gen)).requires_grad_(True)
    mix = torch.randn(NUMEL, C, generator=gen)
    base = 4 * torch.randn(ROWS, N, C, generator=gen)
    base[0] = 0.01 * base[0]                 # a stream of near-uniform predictions (filtered out by EATA)
    states = [method.init_state("cpu") for _ in range(ROWS)]
    for s, st in enumerate(states):          # half the streams carry an earlier request's state, one that makes
        if s % 2 and "mean_probs" in st:     # their first image redundant (EATA's cosine filter)
            st["mean_probs"] = base[s, 0].softmax(0)
            st["mean_probs_set"] = torch.ones(())
    feats = torch.randn(ROWS, N, 8, generator=gen)
    x = torch.zeros(N, 3, 4, 4)
    ctxs = [StepContext(x=x, theta=thetas[s].detach(), theta0=theta0, state=states[s], forward=_no_forward,
                        timer=Timer(), source_stats=stats) for s in range(ROWS)]

    def forward(th):   # logits and features that depend on each stream's own row only
        shift = 0.1 * (th @ mix).unsqueeze(1)
        return base + shift, feats * (1 + th[:, :8].unsqueeze(1))
    return method, ctxs, thetas, forward


#: per method, the hyperparameter variants to compare (EATA also with a tight entropy margin: most images filtered)
VARIANTS = [(name, {}) for name in FUSABLE] + [("eata", {"e_margin": 0.2 * math.log(C)})]


@pytest.mark.parametrize("name,extra", VARIANTS, ids=[f"{n}-{'tight' if e else 'default'}" for n, e in VARIANTS])
def test_objective_many_equals_objective_per_stream(name, extra):
    method, ctxs, thetas, forward = _setup(name, 0, **extra)
    logits, feats = forward(thetas)
    f = list(feats.unbind(0)) if method.needs_features else None
    many = method.objective_many(ctxs, thetas, logits, f)
    assert isinstance(many, Objectives)
    assert many.losses.shape == (ROWS,)
    (g_many,) = torch.autograd.grad(many.losses[[s for s in range(ROWS) if many.has_loss[s]]].sum(), thetas,
                                    allow_unused=True)
    for s in range(ROWS):
        th = thetas.detach()[s].clone().requires_grad_(True)
        lg, ft = forward(torch.cat([thetas.detach()[:s], th.unsqueeze(0), thetas.detach()[s + 1:]]))
        loss, updates, n = method.objective(ctxs[s], th, lg[s], ft[s] if method.needs_features else None)
        assert many.has_loss[s] == (loss is not None), s
        if loss is None:
            continue
        assert many.selected[s] == n, s
        torch.testing.assert_close(many.losses[s], loss, rtol=1e-6, atol=1e-6)
        assert many.state_updates[s].keys() == updates.keys()
        for k, v in updates.items():
            torch.testing.assert_close(many.state_updates[s][k], v, rtol=1e-6, atol=1e-6)
        (g,) = torch.autograd.grad(loss, th)
        assert g_many is not None
        torch.testing.assert_close(g_many[s], g, rtol=1e-5, atol=1e-6)
    assert any(many.has_loss)
    if name == "eata":   # streams the filter rejects and streams with some images rejected
        assert not all(many.has_loss) and any(0 < k < N for k in many.selected), many.selected
