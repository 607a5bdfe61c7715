"""The gradient memory layer and the optimizers against their equations."""

import pytest
import torch

from mgg_core.mgg import GradientMemoryLayer, layer_norm, layer_norm_l2_grad, num_meta_parameters
from mgg_core.optim import MGG, SGD, Adam, mgg_tokens


@pytest.fixture
def gml():
    g = GradientMemoryLayer(seed=3)
    with torch.no_grad():  # move off the symmetric init so every term matters
        for p in g.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return g.double()


def _inputs(n=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=gen, dtype=torch.float64) * 3
    W = torch.randn(n, 8, 8, generator=gen, dtype=torch.float64) * 0.1
    b = torch.randn(n, 8, generator=gen, dtype=torch.float64) * 0.1
    return x, W, b


def test_meta_parameter_count_is_164():
    assert num_meta_parameters(GradientMemoryLayer()) == 164


def test_closed_form_ln_l2_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(11, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randn(11, 8, generator=gen, dtype=torch.float64)
    gamma = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(8, generator=gen, dtype=torch.float64)
    loss = 0.5 * (layer_norm(z, gamma, beta) - target).pow(2).sum()
    (auto,) = torch.autograd.grad(loss, z)
    assert torch.allclose(layer_norm_l2_grad(z.detach(), target, gamma, beta), auto, atol=1e-10)


def test_step1_memorise_equals_autograd_gradient_step(gml):
    x, W, b = _inputs()
    q, k, v = gml.projections(x)
    eta = gml.inner_lr(x).reshape(-1)
    Wg, bg = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    loss = gml.reconstruction_loss(k.detach(), v.detach(), Wg, bg).sum()  # memories are independent
    gW, gb = torch.autograd.grad(loss, (Wg, bg))
    W_new, b_new = gml.memorise(k, v, eta, W, b)
    assert torch.allclose(W_new, W - eta[:, None, None] * gW, atol=1e-10)
    assert torch.allclose(b_new, b - eta[:, None] * gb, atol=1e-10)
    # and the step lowers each memory's reconstruction loss for a small enough eta
    small = 1e-3 * torch.ones_like(eta)
    W_s, b_s = gml.memorise(k, v, small, W, b)
    assert (gml.reconstruction_loss(k, v, W_s, b_s) < gml.reconstruction_loss(k, v, W, b)).all()


def test_inner_lr_formula(gml):
    x, _, _ = _inputs()
    expected = max(1 + float(gml.tau.detach()), 0) * torch.sigmoid(x @ gml.w_eta + gml.b_eta) / 8
    assert torch.allclose(gml.inner_lr(x), expected)
    with torch.no_grad():
        gml.tau.fill_(-1.5)  # max(1 + tau, 0) = 0: the memory must not move
    x, W, b = _inputs()
    q, k, v = gml.projections(x)
    W_new, b_new = gml.memorise(k, v, gml.inner_lr(x).reshape(-1), W, b)
    assert torch.equal(W_new, W) and torch.equal(b_new, b)


def test_readout_equals_primal_and_dual_forms(gml):
    x, W, b = _inputs()
    q, k, v = gml.projections(x)
    eta = gml.inner_lr(x).reshape(-1)
    u, W_new, b_new = gml(x, W, b)
    # primal: read the updated memory explicitly
    z_primal = q + layer_norm(torch.einsum("ni,nij->nj", q, W_new) + b_new, gml.ln_gamma, gml.ln_beta)
    u_primal = torch.tanh(layer_norm(z_primal, gml.post_gamma, gml.post_beta) @ gml.w_o)
    # dual (TTT paper): q W - eta (q . k) dl/dZ + b - eta dl/dZ, never forming W'
    zk = torch.einsum("ni,nij->nj", k, W) + b
    gz = layer_norm_l2_grad(zk, v - k, gml.ln_gamma, gml.ln_beta)
    dual = torch.einsum("ni,nij->nj", q, W) - (eta * (q * k).sum(-1))[:, None] * gz + b - eta[:, None] * gz
    z_dual = q + layer_norm(dual, gml.ln_gamma, gml.ln_beta)
    u_dual = torch.tanh(layer_norm(z_dual, gml.post_gamma, gml.post_beta) @ gml.w_o)
    assert torch.allclose(u, u_primal, atol=1e-12)
    assert torch.allclose(u, u_dual, atol=1e-10)
    assert u.shape == (x.shape[0],) and (u.abs() < 1).all()


def test_tokens_equal_adam_normalised_formula():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(5, generator=gen, dtype=torch.float64)
    v = torch.rand(5, generator=gen, dtype=torch.float64)
    g = torch.randn(5, generator=gen, dtype=torch.float64)
    step = 4
    tok, m2, v2 = mgg_tokens(g, m, v, step)
    m_ref = 0.9 * m + 0.1 * g
    v_ref = 0.99 * v + 0.01 * g ** 2
    m_hat = m_ref / (1 - 0.9 ** (step + 1))   # the reference's exponent t + 1
    v_hat = v_ref / (1 - 0.99 ** (step + 1))
    assert torch.allclose(m2, m_ref) and torch.allclose(v2, v_ref)
    assert torch.allclose(tok[:, 0], m_hat / (v_hat.sqrt() + 1e-8))
    assert torch.allclose(tok[:, 1], g / (v_hat.sqrt() + 1e-8))
    tok0, _, _ = mgg_tokens(g, m, v, step, bias_correction_offset=0)  # Adam's own correction
    assert torch.allclose(tok0[:, 1], g / ((v_ref / (1 - 0.99 ** step)).sqrt() + 1e-8))


def test_mgg_update_is_bounded_by_alpha_and_carries_memory():
    opt = MGG(GradientMemoryLayer(seed=1), lr=1e-3)
    theta = torch.randn(500)
    state = opt.init_state(theta)
    assert torch.equal(state["memory_W"][0], opt.gml.W0.detach()) and state["memory_W"].shape == (500, 8, 8)
    for scale in (1e-8, 1.0, 1e8):
        grad = torch.randn(500) * scale
        new_theta, new_state = opt.update(theta, grad, state)
        assert (new_theta - theta).abs().max() <= 1e-3 * (1 + 1e-6)
        assert not torch.equal(new_state["memory_W"], state["memory_W"])  # the memory moved
        assert float(new_state["step"]) == float(state["step"]) + 1
        theta, state = new_theta, new_state


def test_sgd_and_adam_match_torch():
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(20, generator=gen, dtype=torch.float64)
    grads = [torch.randn(20, generator=gen, dtype=torch.float64) for _ in range(6)]
    for ours, ref_cls, kw in ((SGD(lr=0.1, momentum=0.9), torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                              (Adam(lr=0.01), torch.optim.Adam, dict(lr=0.01))):
        p = torch.nn.Parameter(theta0.clone())
        ref = ref_cls([p], **kw)
        theta, st = theta0.clone(), ours.init_state(theta0)
        for g in grads:
            p.grad = g.clone()
            ref.step()
            theta, st = ours.update(theta, g, st)
        assert torch.allclose(theta, p.detach(), atol=1e-12), ours.name


def test_mgg_checkpoint_round_trip(tmp_path):
    g = GradientMemoryLayer(seed=5)
    g.save(tmp_path / "m.safetensors", card={"note": "test"})
    h = GradientMemoryLayer.load(tmp_path / "m.safetensors")
    for (n1, p1), (n2, p2) in zip(g.state_dict().items(), h.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    x, W, b = _inputs(seed=2)
    assert torch.equal(g.double()(x, W, b)[0], h.double()(x, W, b)[0])
    assert num_meta_parameters(h) == 164 and h.hidden == 8 and h.token_dim == 2
