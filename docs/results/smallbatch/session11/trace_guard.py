"""Diagnostic only (session 10, extended in session 11; decides nothing): what the guard does on a continual stream,
per request and per domain. Runs the service's ResNet engine (with ``--set`` EngineConfig overrides, ``--guard``
GuardConfig overrides as JSON) over one held-out or test continual stream and prints, per domain: source and adapted
accuracy, the fallbacks by reason, the images held at source, and the images the stream got wrong while the source
got them right (and the reverse) in the first 8 requests after each fallback ("after") and elsewhere ("other").
``--trace DOMAIN_PREFIX`` adds one line per request of the matching domains (correct of 16 adapted / source, hold
before the request, rollback reason, hold release, the guard's agreement, entropy gap, excess share and source
diversity (the normalised entropy of the source's recent prediction histogram; below ``min_source_diversity`` the
guard does not judge against the source) after the request; ``hdiv``: the same of the kept history when
``keep_source_history`` is on). Session 11 adds per domain the requests after a fallback (until the next one) on
which the guard is *blind*, from the fallback until it first judges against the source again (or holds, or falls
back): the stream is not held, past the warm-up (``warmup_images`` images, ``warmup_checks`` checked images) and the
guard does not judge against the source because the source histogram it reads for the diversity check is below
``min_source_diversity`` (``blind after``), and the same elsewhere (``blind other``: a source with few classes
before any fallback); and, at the end, each fallback's blind count.

Usage: python docs/results/smallbatch/session10/trace_guard.py heldout|test [--seed S] [--images N] [--shift
none|0.1] [--set K=JSON ...] [--guard JSON] [--trace PREFIX ...]
"""
import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, "scripts")
sys.path.insert(0, "docs/results/smallbatch/session8")
from smallbatch_sweep import _parse_set, engine_variant, load_default_runtime
from trace_labels import _batches

from mgg_core.guard import source_diversity, source_reference

AFTER = 8


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("stream", choices=["heldout", "test"])
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--shift", default="0.1")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--guard", default="{}")
    p.add_argument("--trace", nargs="*", default=[])
    args = p.parse_args()
    if args.seed is None:
        args.seed = 1 if args.stream == "heldout" else 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    rt = load_default_runtime("resnet")
    over = _parse_set(args.set)
    gover = json.loads(args.guard)
    if gover:
        over["guard"] = dataclasses.replace(rt.engine.config.guard, **gover)
    eng = engine_variant(rt, **over)
    print(f"# stream={args.stream} seed={args.seed} images={args.images} shift={args.shift} set={args.set} "
          f"guard={gover}", flush=True)
    state = eng.new_state(seed=0)
    per: dict[str, dict] = {}
    since_fb = 10 ** 9
    cfg = eng.config.guard
    blind_runs: list[list] = []      # per fallback: request, domain, reason, blind requests in a row after it
    open_run = False                 # since the last fallback the guard has not yet judged against the source
    for i, (dom, x, y) in enumerate(_batches(args, rt)):
        hold = float(state.tensors.get("guard.hold", torch.zeros(())))
        res = eng.step(state, x)
        with torch.no_grad():
            s_ok = eng.source_predict(x).argmax(1) == y
        a_ok = res.logits.argmax(1) == y
        c = per.setdefault(dom, {"n": 0, "src": 0, "ad": 0, "fb": {}, "held": 0, "rel": 0,
                                 "after_lost": 0, "after_won": 0, "other_lost": 0, "other_won": 0,
                                 "blind_after": 0, "blind_other": 0})
        c["n"] += len(y)
        c["src"] += int(s_ok.sum())
        c["ad"] += int(a_ok.sum())
        c["held"] += len(y) if hold > 0 else 0
        where = "after" if since_fb < AFTER else "other"
        c[where + "_lost"] += int((s_ok & ~a_ok).sum())
        c[where + "_won"] += int((a_ok & ~s_ok).sum())
        since_fb += 1
        g = state.tensors
        gg = {k[6:]: v for k, v in g.items() if k.startswith("guard.")}
        blind = (res.rollback_reason is None and float(g["guard.hold"]) <= 0 and state.images >= cfg.warmup_images
                 and float(g["guard.checked"]) >= cfg.warmup_checks
                 and source_diversity(source_reference(gg)) < cfg.min_source_diversity)
        warm = state.images < cfg.warmup_images or float(g["guard.checked"]) < cfg.warmup_checks
        if blind:
            c["blind_after" if open_run else "blind_other"] += 1
            if open_run:
                blind_runs[-1][3] += 1
        elif not warm or float(g["guard.hold"]) > 0:
            open_run = False         # the guard judges against the source again (or the stream is held)
        if res.rollback_reason is not None:
            r = str(res.rollback_reason.value)
            blind_runs.append([i, dom, r, 0])
            open_run = float(g["guard.hold"]) <= 0
            c["fb"][r] = c["fb"].get(r, 0) + 1
            since_fb = 0
        if res.hold_released is not None:
            c["rel"] += 1
        if any(dom.startswith(d) for d in args.trace):
            ah, sh = g["guard.adapted_hist"], g["guard.source_hist"]
            top = int(ah.argmax())
            print(f"{i:4d} {dom[:24]:24s} a={int(a_ok.sum()):2d} s={int(s_ok.sum()):2d} hold={hold:5.0f} "
                  f"step={state.step:3d} agr={float(g['guard.agreement']):.3f} "
                  f"gap={float(g['guard.entropy_gap']):+.3f} "
                  f"exc={float(ah[top] - sh[top]):+.3f} sdiv={source_diversity(sh):.2f} "
                  f"hdiv={source_diversity(source_reference(gg)):.2f} blind={int(blind)} "
                  f"chk={float(g['guard.checked']):3.0f} "
                  f"rb={None if res.rollback_reason is None else res.rollback_reason.value} "
                  f"rel={None if res.hold_released is None else res.hold_released.value}", flush=True)
    print("\n| domain | src | adapt | gap | fallbacks | held | releases | lost/won after fallback | lost/won other "
          "| blind after / other |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- | --- |")
    for dom, c in per.items():
        print(f"| {dom} | {100 * c['src'] / c['n']:.1f} | {100 * c['ad'] / c['n']:.1f} | "
              f"{100 * (c['ad'] - c['src']) / c['n']:+.1f} | {c['fb'] or '-'} | {c['held']} | {c['rel']} | "
              f"{c['after_lost']}/{c['after_won']} | {c['other_lost']}/{c['other_won']} | "
              f"{c['blind_after']}/{c['blind_other']} |", flush=True)
    print("\nfallbacks (request, domain, reason, blind requests before the guard judges again):")
    for req, dom, r, n in blind_runs:
        print(f"  {req:4d} {dom} {r} blind={n}")
    total = sum(r[3] for r in blind_runs)
    print(f"blind after fallbacks: {total} requests over {len(blind_runs)} fallbacks", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
