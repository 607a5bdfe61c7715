"""The guard's vectorised signal update (``guard.observe_many``) against a per-stream reference
(``reference_observe`` below: the guard's per-stream update as it was before the vectorised one replaced it, kept
here as the test's oracle).

Streams of mixed request sizes and checked counts, fresh (NaN / empty signals) and warm, holding and not, with and
without source checks and images, over several consecutive requests: every signal of every stream agrees with
``reference_observe`` called per stream, within float rounding; ``guard.observe`` (one stream) too.
"""
from __future__ import annotations

import math

import pytest
import torch

from mgg_core import guard
from mgg_core.guard import GuardConfig, _keep, guard_init_state, image_descriptor, observe_many
from mgg_core.losses import softmax_entropy

C = 10
CFG = GuardConfig(enabled=True, horizon_images=16, shift_images=2, shift_reference_images=6, source_confidence=0.3)


def _ema(old: torch.Tensor, new: torch.Tensor, keep: float) -> torch.Tensor:
    if bool(torch.isnan(old).any()):
        return new.to(old)
    return keep * old + (1.0 - keep) * new.to(old)


def _mix_hist(old: torch.Tensor, hist: torch.Tensor, keep: float) -> torch.Tensor:
    return hist.to(old) if float(old.sum()) == 0 else keep * old + (1.0 - keep) * hist.to(old)


def _observe_shift(cfg: GuardConfig, g: dict[str, torch.Tensor], out: dict[str, torch.Tensor],
                   images: torch.Tensor, holding: bool) -> None:
    """The descriptor's fast EMA; while holding, the hold's reference until it has ``shift_reference_images``."""
    d = image_descriptor(images).to(g["shift_fast"])
    n = d.shape[0]
    out["shift_fast"] = _ema(g["shift_fast"], d.mean(0), (1.0 - 1.0 / cfg.shift_images) ** n)
    seen = float(g["shift_ref_n"])
    if holding and seen < cfg.shift_reference_images:   # running mean over the hold's first images
        w = n / (seen + n)
        out["shift_ref"] = (1 - w) * g["shift_ref"] + w * d.mean(0)
        out["shift_ref_sq"] = (1 - w) * g["shift_ref_sq"] + w * d.pow(2).mean(0)
        out["shift_ref_n"] = g["shift_ref_n"] + n


def reference_observe(cfg: GuardConfig, g: dict[str, torch.Tensor], logits: torch.Tensor,
            source_logits: torch.Tensor | None, images: torch.Tensor | None = None,
            holding: bool = False) -> dict[str, torch.Tensor]:
    """Updated guard signals after one request (``source_logits``: of the request's first checked images;
    ``images``: the request, for the domain-shift descriptor; ``holding``: the request was held at source)."""
    n, c = logits.shape
    ln_c = math.log(c)
    keep = _keep(cfg, n)
    ent = (softmax_entropy(logits.float()) / ln_c).clamp(0, 1)
    hist = torch.bincount(logits.argmax(1), minlength=c).float() / n
    out = dict(g)
    if images is not None and "shift_fast" in g:
        _observe_shift(cfg, g, out, images, holding)
    out["entropy_ema"] = _ema(g["entropy_ema"], ent.mean(), keep)
    out["class_share"] = _mix_hist(g["class_share"], hist, keep)
    if source_logits is None or source_logits.shape[0] == 0:
        return out
    k = source_logits.shape[0]
    keep_k = keep            # time constants in stream images: the checked images stand for the whole request
    a, s = logits[:k].float(), source_logits.float()
    a_pred, s_prob = a.argmax(1), s.softmax(1)
    out["adapted_hist"] = _mix_hist(g["adapted_hist"], torch.bincount(a_pred, minlength=c).float() / k, keep_k)
    out["source_hist"] = _mix_hist(g["source_hist"], torch.bincount(s_prob.argmax(1), minlength=c).float() / k,
                                   keep_k)
    s_ent = softmax_entropy(s).mean() / ln_c
    out["entropy_gap"] = _ema(g["entropy_gap"], softmax_entropy(a).mean() / ln_c - s_ent, keep_k)
    if "source_entropy" in g:
        out["source_entropy"] = _ema(g["source_entropy"], s_ent, keep_k)
    conf = s_prob.max(1).values >= cfg.source_confidence
    out["confident_share"] = _ema(g["confident_share"], conf.float().mean(), keep_k)
    if bool(conf.any()):
        agree = (a_pred[conf] == s_prob.argmax(1)[conf]).float().mean()
        out["agreement"] = _ema(g["agreement"], agree, keep)
        out["confident"] = g["confident"] + int(conf.sum())
    out["checked"] = g["checked"] + k
    return out


def _request(gen: torch.Generator, n: int, k: int | None, images: bool):
    logits = 3 * torch.randn(n, C, generator=gen)
    logits[:, 0] += 2.0 * torch.rand((), generator=gen)       # some streams lean to one class
    src = None if k is None else 3 * torch.randn(k, C, generator=gen)
    x = torch.rand(n, 3, 8, 8, generator=gen) * torch.rand((), generator=gen) if images else None
    return logits, src, x


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


#: per stream: request size, checked images (None: no source check), images given, holding
STREAMS = [(4, 1, True, False), (4, 1, True, True), (4, 1, True, False), (4, 0, True, False), (4, None, True, True),
           (1, 1, True, True), (3, 2, False, False), (8, 2, True, True), (8, 2, True, False), (16, 4, True, True)]


@pytest.mark.parametrize("source_confidence", [0.3, 0.99])
def test_observe_many_equals_observe_per_stream(source_confidence):
    cfg = GuardConfig(**{**CFG.__dict__, "source_confidence": source_confidence})
    gen = torch.Generator().manual_seed(0)
    # stream 2 has the older signal layout (no source entropy EMA: engines whose confident-source check is off)
    many = [guard_init_state(C, "cpu", source_entropy=s != 2) for s in range(len(STREAMS))]
    alone = [dict(g) for g in many]
    for step in range(8):
        requests = [_request(gen, n, k, img) for n, k, img, _ in STREAMS]
        holding = [h and step >= 2 for *_, h in STREAMS]     # holds start later: references begin mid-stream
        many = observe_many(cfg, many, [r[0] for r in requests], [r[1] for r in requests],
                            [r[2] for r in requests], holding)
        one = [guard.observe(cfg, g, r[0], r[1], images=r[2], holding=h)
               for g, r, h in zip(alone, requests, holding, strict=True)]
        alone = [reference_observe(cfg, g, r[0], r[1], images=r[2], holding=h)
                 for g, r, h in zip(alone, requests, holding, strict=True)]
        for s, (a, b, o) in enumerate(zip(many, alone, one, strict=True)):
            assert a.keys() == b.keys() == o.keys()
            for key in a:
                _close(a[key], b[key], f"step {step} stream {s} {key}")
                _close(o[key], b[key], f"step {step} stream {s} {key} (observe)")
    checked = [float(g["checked"]) for g in alone]
    assert min(checked[i] for i, s in enumerate(STREAMS) if s[1]) > 0 and max(float(g["shift_ref_n"])
                                                                              for g in alone) > 0


def test_observe_many_keeps_untouched_signals_and_does_not_mutate_inputs():
    gen = torch.Generator().manual_seed(1)
    gs = [guard_init_state(C, "cpu") for _ in range(3)]
    for g in gs:
        g["credit"] = torch.tensor(0.75)
        g["hold"] = torch.tensor(5.0)
    before = [{k: v.clone() for k, v in g.items()} for g in gs]
    reqs = [_request(gen, 4, 1, True) for _ in gs]
    out = observe_many(CFG, gs, [r[0] for r in reqs], [r[1] for r in reqs], [r[2] for r in reqs], [False] * 3)
    for g, b, o in zip(gs, before, out, strict=True):
        for k in g:
            assert torch.equal(g[k], b[k]) or (torch.isnan(g[k]).all() and torch.isnan(b[k]).all()), k
        assert o["credit"] is g["credit"] and o["hold"] is g["hold"]
        assert float(o["checked"]) == 1 and not torch.isnan(o["entropy_ema"])


def test_observe_many_of_nothing_is_nothing():
    assert observe_many(CFG, [], [], [], [], []) == []
