"""Diagnostic only (session 10; decides nothing): what the guard does on a continual stream, per request and per
domain. Runs the service's ResNet engine (with ``--set`` EngineConfig overrides, ``--guard`` GuardConfig overrides as
JSON) over one held-out or test continual stream and prints, per domain: source and adapted accuracy, the fallbacks
by reason, the images held at source, and the images the stream got wrong while the source got them right (and the
reverse) in the first 8 requests after each fallback ("after") and elsewhere ("other"). ``--trace DOMAIN_PREFIX``
adds one line per request of the matching domains (correct of 16 adapted / source, hold before the request,
rollback reason, hold release, the guard's agreement, entropy gap, excess share and source diversity (the
normalised entropy of the source's recent prediction histogram; below ``min_source_diversity`` the guard does not
judge against the source) after the request).

Usage: python docs/results/smallbatch/session10/trace_guard.py heldout|test [--seed S] [--images N]
       [--shift none|0.1] [--set K=JSON ...] [--guard JSON] [--trace PREFIX ...]
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

from mgg_core.guard import source_diversity

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
    for i, (dom, x, y) in enumerate(_batches(args, rt)):
        hold = float(state.tensors.get("guard.hold", torch.zeros(())))
        res = eng.step(state, x)
        with torch.no_grad():
            s_ok = eng.source_predict(x).argmax(1) == y
        a_ok = res.logits.argmax(1) == y
        c = per.setdefault(dom, {"n": 0, "src": 0, "ad": 0, "fb": {}, "held": 0, "rel": 0,
                                 "after_lost": 0, "after_won": 0, "other_lost": 0, "other_won": 0})
        c["n"] += len(y)
        c["src"] += int(s_ok.sum())
        c["ad"] += int(a_ok.sum())
        c["held"] += len(y) if hold > 0 else 0
        where = "after" if since_fb < AFTER else "other"
        c[where + "_lost"] += int((s_ok & ~a_ok).sum())
        c[where + "_won"] += int((a_ok & ~s_ok).sum())
        since_fb += 1
        if res.rollback_reason is not None:
            r = str(res.rollback_reason.value)
            c["fb"][r] = c["fb"].get(r, 0) + 1
            since_fb = 0
        if res.hold_released is not None:
            c["rel"] += 1
        if any(dom.startswith(d) for d in args.trace):
            g = state.tensors
            ah, sh = g["guard.adapted_hist"], g["guard.source_hist"]
            top = int(ah.argmax())
            print(f"{i:4d} {dom[:24]:24s} a={int(a_ok.sum()):2d} s={int(s_ok.sum()):2d} hold={hold:5.0f} "
                  f"step={state.step:3d} agr={float(g['guard.agreement']):.3f} "
                  f"gap={float(g['guard.entropy_gap']):+.3f} "
                  f"exc={float(ah[top] - sh[top]):+.3f} sdiv={source_diversity(sh):.2f} "
                  f"chk={float(g['guard.checked']):3.0f} "
                  f"rb={None if res.rollback_reason is None else res.rollback_reason.value} "
                  f"rel={None if res.hold_released is None else res.hold_released.value}", flush=True)
    print("\n| domain | src | adapt | gap | fallbacks | held | releases | lost/won after fallback | lost/won other |")
    print("| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | --- |")
    for dom, c in per.items():
        print(f"| {dom} | {100 * c['src'] / c['n']:.1f} | {100 * c['ad'] / c['n']:.1f} | "
              f"{100 * (c['ad'] - c['src']) / c['n']:+.1f} | {c['fb'] or '-'} | {c['held']} | {c['rel']} | "
              f"{c['after_lost']}/{c['after_won']} | {c['other_lost']}/{c['other_won']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
