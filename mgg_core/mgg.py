"""MGG's gradient memory layer (GML): a TTT-Linear layer run over adaptation time, one memory per scalar.

Every adapted scalar owns a memory (W: d x d, b: d) that starts from the learned (W0, b0). Per online step the
token x = [m_hat/(sqrt(v_hat)+eps), g/(sqrt(v_hat)+eps)] (2 numbers) is

    k, v, q = x Wk, x Wv, x Wq                                  (2 -> d, no bias)
    eta     = max(1 + tau, 0) * sigmoid(x . w_eta + b_eta) / d    (learned inner step)
    l(W, b) = 1/2 || LN(k W + b) - (v - k) ||^2                  (reconstruction loss, LN with gamma, beta)
    W'      = W - eta k^T dl/dZ ;  b' = b - eta dl/dZ            (step 1, memorise)
    z       = q + LN(q W' + b')                                  (step 2, generate)
    u       = tanh(LN_post(z) . w_o)                             (u in (-1, 1))

and the classifier parameter moves by -alpha * u. All scalars are processed at once (batched tensor math);
the meta-weights phi (164 numbers for d = 8) are shared by all of them. Everything is differentiable in phi,
which the offline pretraining uses.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .io import atomic_path

LN_EPS = 1e-6


def layer_norm(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    mu = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return gamma * (x - mu) / torch.sqrt(var + eps) + beta


def layer_norm_l2_grad(z: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                       eps: float = LN_EPS) -> torch.Tensor:
    """d/dz of 1/2 ||LN(z) - target||^2, in closed form (row-wise over the last dimension)."""
    d = z.shape[-1]
    mu = z.mean(dim=-1, keepdim=True)
    std = torch.sqrt(z.var(dim=-1, keepdim=True, unbiased=False) + eps)
    z_hat = (z - mu) / std
    grad_hat = (gamma * z_hat + beta - target) * gamma
    proj = z_hat * (grad_hat * z_hat).sum(-1, keepdim=True)
    return (d * grad_hat - grad_hat.sum(-1, keepdim=True) - proj) / (d * std)


class GradientMemoryLayer(nn.Module):
    """The MGG meta-network. ``forward(x, W, b) -> (u, W', b')`` for N scalars at once."""

    def __init__(self, hidden: int = 8, token_dim: int = 2, seed: int | None = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def normal(*shape: int, std: float) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen) * std)

        bound = 1.0 / math.sqrt(token_dim)
        self.hidden = hidden
        self.token_dim = token_dim
        self.w_q = nn.Parameter((torch.rand(token_dim, hidden, generator=gen) * 2 - 1) * bound)
        self.w_k = nn.Parameter((torch.rand(token_dim, hidden, generator=gen) * 2 - 1) * bound)
        self.w_v = nn.Parameter((torch.rand(token_dim, hidden, generator=gen) * 2 - 1) * bound)
        self.w_eta = normal(token_dim, std=0.02)
        self.b_eta = nn.Parameter(torch.zeros(1))
        self.tau = nn.Parameter(torch.zeros(1))
        self.W0 = normal(hidden, hidden, std=0.02)
        self.b0 = nn.Parameter(torch.zeros(hidden))
        self.ln_gamma = nn.Parameter(torch.ones(hidden))
        self.ln_beta = nn.Parameter(torch.zeros(hidden))
        self.post_gamma = nn.Parameter(torch.ones(hidden))
        self.post_beta = nn.Parameter(torch.zeros(hidden))
        self.w_o = nn.Parameter((torch.rand(hidden, generator=gen) * 2 - 1) / math.sqrt(hidden))

    # --- memory -----------------------------------------------------------------------------------------------
    def initial_memory(self, n: int, device=None, dtype=torch.float32,
                       in_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) for n fresh scalars: copies of the learned W0, b0. ``in_graph`` keeps them as differentiable
        views of W0, b0 (meta-training learns the initial memory through them)."""
        if in_graph:
            return (self.W0.to(device=device, dtype=dtype).expand(n, self.hidden, self.hidden),
                    self.b0.to(device=device, dtype=dtype).expand(n, self.hidden))
        W = self.W0.detach().to(device=device, dtype=dtype).expand(n, self.hidden, self.hidden).clone()
        b = self.b0.detach().to(device=device, dtype=dtype).expand(n, self.hidden).clone()
        return W, b

    # --- pieces, exposed for tests ------------------------------------------------------------------------------
    def projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return x @ self.w_q, x @ self.w_k, x @ self.w_v

    def inner_lr(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(1.0 + self.tau, min=0.0) * torch.sigmoid(x @ self.w_eta + self.b_eta) / self.hidden

    def reconstruction_loss(self, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-scalar l = 1/2 ||LN(k W + b) - (v - k)||^2 (shape N)."""
        z = torch.bmm(k.unsqueeze(1), W).squeeze(1) + b
        return 0.5 * (layer_norm(z, self.ln_gamma, self.ln_beta) - (v - k)).pow(2).sum(-1)

    def memorise(self, k, v, eta, W, b):
        """Step 1: one gradient step of each memory on its reconstruction loss."""
        z = torch.bmm(k.unsqueeze(1), W).squeeze(1) + b
        grad_z = layer_norm_l2_grad(z, v - k, self.ln_gamma, self.ln_beta)
        W_new = W - eta[:, None, None] * k.unsqueeze(2) * grad_z.unsqueeze(1)
        b_new = b - eta[:, None] * grad_z
        return W_new, b_new

    def generate(self, q, W, b) -> torch.Tensor:
        """Step 2: read the updated memory with the query; u in (-1, 1)."""
        z = q + layer_norm(torch.bmm(q.unsqueeze(1), W).squeeze(1) + b, self.ln_gamma, self.ln_beta)
        return torch.tanh(layer_norm(z, self.post_gamma, self.post_beta) @ self.w_o)

    def forward(self, x: torch.Tensor, W: torch.Tensor, b: torch.Tensor):
        q, k, v = self.projections(x)
        eta = self.inner_lr(x).reshape(-1)
        W_new, b_new = self.memorise(k, v, eta, W, b)
        return self.generate(q, W_new, b_new), W_new, b_new

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save(self, path: str | Path, card: dict | None = None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"hidden": str(self.hidden), "token_dim": str(self.token_dim)}
        with atomic_path(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp),
                      metadata=meta)
            os.chmod(tmp, 0o644)                 # a published checkpoint (atomic_path's temp file is 0600)
        if card is not None:
            with atomic_path(path.with_suffix(".json")) as tmp:
                tmp.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
                os.chmod(tmp, 0o644)

    @classmethod
    def load(cls, path: str | Path, device=None) -> GradientMemoryLayer:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MGG checkpoint not found: {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        gml = cls(hidden=int(meta.get("hidden", 8)), token_dim=int(meta.get("token_dim", 2)), seed=None)
        gml.load_state_dict(load_file(str(path)))
        return gml.to(device) if device is not None else gml


def num_meta_parameters(gml: GradientMemoryLayer) -> int:
    return sum(p.numel() for p in gml.parameters())


__all__ = ["GradientMemoryLayer", "layer_norm", "layer_norm_l2_grad", "num_meta_parameters"]
