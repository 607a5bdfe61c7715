"""The guard's vectorised signal update (``guard.observe_many``) against its per-stream reference (``observe``).

Streams of mixed request sizes and checked counts, fresh (NaN / empty signals) and warm, holding and not, with and
without source checks and images, over several consecutive requests: every signal of every stream agrees with
``observe`` called per stream, within float rounding.
"""
from __future__ import annotations

import pytest
import torch

from mgg_core.guard import GuardConfig, guard_init_state, observe, observe_many

C = 10
CFG = GuardConfig(enabled=True, horizon_images=16, shift_images=2, shift_reference_images=6, source_confidence=0.3)


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
        alone = [observe(cfg, g, r[0], r[1], images=r[2], holding=h)
                 for g, r, h in zip(alone, requests, holding, strict=True)]
        for s, (a, b) in enumerate(zip(many, alone, strict=True)):
            assert a.keys() == b.keys()
            for key in a:
                _close(a[key], b[key], f"step {step} stream {s} {key}")
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
