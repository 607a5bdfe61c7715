"""Diagnostic only (session 8; decides nothing): where the class-balanced statistics' pre-pass pseudo-labels are
right and where wrong. Runs the service's ResNet engine with overrides (e.g. ``bn_balanced=1.0``,
``bn_balanced_form="correction"``) over one continual stream and records, per domain, from the engine's own no-grad
pre-pass (``StreamNormStats.pseudo_labels`` is wrapped on this engine instance only; no library code changes):

* ``pre``: accuracy of the pre-pass argmax labels (the labels the class statistics are built from, before any gate);
* ``c90`` / ``c97``: share of pre-pass images with max softmax >= 0.9 / 0.97, and the accuracy of those labels;
* ``src`` / ``adapt`` / ``gap``: the frozen source model's accuracy (= no adaptation) and the engine's response
  accuracy, and their difference;
* ``agr``: share of pre-pass labels equal to the source model's prediction (label-free), the accuracy of the agreeing
  labels (``agrAcc``) and of the disagreeing ones (``disAcc``); ``a&c90``: agreeing and max softmax >= 0.9;
* ``scf90``: share of images the *source* is >= 0.9 confident on, and the source's accuracy there;
* ``npred`` / ``ntrue``: distinct pre-pass labels / true classes in the domain.

``--trace`` lines add ``rho``: the sum of the recent class mix ``norm.<layer>.cmix`` after the request at the first,
a middle and the last BatchNorm layer (with the confidence gate: the layer's recent confident share).

Images of a request without a pre-pass (a hold at source, a request that moves no statistics) are counted in src /
adapt only; ``n`` is the pre-pass image count.

Usage (from the worktree root)::

    python docs/results/smallbatch/session8/trace_labels.py heldout|test [--seed S] [--images N] [--shift none|0.1]
        [--set K=JSON ...] [--trace DOMAIN_PREFIX ...] [--threads T]

``heldout``: ``scripts/smallbatch_heldout.py``'s continual stream (its ``heldout_domains``, ``order_stream``,
``continual_batches``; seed 1 by default); ``test``: ``scripts/smallbatch_continual.py``'s spec (seed 0).
``--trace``: one line per request of the matching domains as well.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, "scripts")
from smallbatch_continual import continual_spec, load_batches
from smallbatch_heldout import continual_batches, heldout_domains, order_stream
from smallbatch_sweep import _parse_set, engine_variant, load_default_runtime

KEYS = ("n", "pre", "c90", "c90ok", "c97", "c97ok", "agr", "agrok", "disok", "ac90", "ac90ok", "total", "src", "adapt",
        "scf90", "scf90ok")


def _batches(args, rt):
    shift = None if args.shift == "none" else float(args.shift)
    if args.stream == "heldout":
        doms = heldout_domains(args.images, args.seed)
        return continual_batches(order_stream(doms, shift, args.seed), rt.preprocessor)
    return load_batches(continual_spec(shift, args.seed), rt.preprocessor)


def _tally(c: dict, logits: torch.Tensor | None, src_logits: torch.Tensor, pred: torch.Tensor, y: torch.Tensor):
    """Add one request's counts to the domain's counter ``c``; returns the request's pre-pass line fields."""
    sp = src_logits.softmax(-1)
    s_lab = sp.argmax(-1)
    c["total"] += len(y)
    c["src"] += int((s_lab == y).sum())
    c["adapt"] += int((pred == y).sum())
    s_conf = sp.amax(-1) >= 0.9
    c["scf90"] += int(s_conf.sum())
    c["scf90ok"] += int((s_conf & (s_lab == y)).sum())
    if logits is None:
        return None
    p = logits.softmax(-1)
    lab, conf = p.argmax(-1), p.amax(-1)
    ok, agree = lab == y, lab == s_lab
    c["n"] += len(y)
    c["pre"] += int(ok.sum())
    for tau, k in ((0.9, "c90"), (0.97, "c97")):
        m = conf >= tau
        c[k] += int(m.sum())
        c[k + "ok"] += int((m & ok).sum())
    c["agr"] += int(agree.sum())
    c["agrok"] += int((agree & ok).sum())
    c["disok"] += int((~agree & ok).sum())
    m = agree & (conf >= 0.9)
    c["ac90"] += int(m.sum())
    c["ac90ok"] += int((m & ok).sum())
    c["pred"].update(lab.tolist())
    return int(ok.sum()), int((conf >= 0.9).sum()), int(((conf >= 0.9) & ok).sum()), int(agree.sum()), \
        int((agree & ok).sum())


def _rho(state) -> str:
    """The recent class mix's total (the recent confident share rho with the gate, 1 without) at the first, a
    middle and the last BatchNorm layer after the request (``"correction"`` only)."""
    keys = [k for k in state.tensors if k.endswith(".cmix")]
    if not keys:
        return "-"
    return "/".join(f"{float(state.tensors[keys[j]].sum()):.2f}" for j in (0, len(keys) // 2, -1))


def _pct(a, b):
    return f"{100 * a / b:5.1f}" if b else "    -"


def _row(dom: str, c: dict) -> str:
    n = c["n"]
    return (f"| {dom} | {n} | {_pct(c['src'], c['total'])} | {_pct(c['adapt'], c['total'])} | "
            f"{100 * (c['adapt'] - c['src']) / c['total']:+.1f} | {_pct(c['pre'], n)} | "
            f"{_pct(c['c90'], n)} / {_pct(c['c90ok'], c['c90'])} | "
            f"{_pct(c['c97'], n)} / {_pct(c['c97ok'], c['c97'])} | "
            f"{_pct(c['agr'], n)} / {_pct(c['agrok'], c['agr'])} / {_pct(c['disok'], n - c['agr'])} | "
            f"{_pct(c['ac90'], n)} / {_pct(c['ac90ok'], c['ac90'])} | "
            f"{_pct(c['scf90'], c['total'])} / {_pct(c['scf90ok'], c['scf90'])} | "
            f"{len(c['pred'])} / {len(c['true'])} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stream", choices=["heldout", "test"])
    p.add_argument("--seed", type=int, default=None, help="heldout: 1, test: 0")
    p.add_argument("--images", type=int, default=400, help="heldout: images per domain")
    p.add_argument("--shift", default="0.1")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--trace", nargs="*", default=[])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.seed is None:
        args.seed = 1 if args.stream == "heldout" else 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    rt = load_default_runtime("resnet")
    over = _parse_set(args.set)
    eng = engine_variant(rt, **over)
    captured: list[torch.Tensor] = []
    inner = eng.norm.pseudo_labels

    def spy(logits, *source):              # the engine's pre-pass logits, then its own labelling (with the
        captured.append(logits.detach().reshape(-1, logits.shape[-1]))     # agreement gate: the source's logits too)
        return inner(logits, *source)

    eng.norm.pseudo_labels = spy
    print(f"# stream={args.stream} seed={args.seed} images={args.images if args.stream == 'heldout' else '-'} "
          f"shift={args.shift} overrides={over} threads={args.threads}", flush=True)
    batches = _batches(args, rt)
    state = eng.new_state(seed=0)
    per: dict[str, dict] = {}
    for i, (dom, x, y) in enumerate(batches):
        captured.clear()
        res = eng.step(state, x)
        with torch.no_grad():
            src = eng.source_predict(x)
        logits = captured[0] if captured and captured[0].shape[0] == len(y) else None
        c = per.setdefault(dom, {**dict.fromkeys(KEYS, 0), "pred": set(), "true": set()})
        c["true"].update(y.tolist())
        line = _tally(c, logits, src, res.logits.argmax(1), y)
        if any(dom.startswith(d) for d in args.trace):
            fields = ("no pre-pass" if line is None else
                      "pre_ok={:2d} c90={:2d} c90_ok={:2d} agr={:2d} agr_ok={:2d}".format(*line))
            print(f"{i:4d} {dom[:26]:26s} a={int((res.logits.argmax(1) == y).sum()):2d} "
                  f"s={int((src.argmax(1) == y).sum()):2d} {fields} cls={sorted(set(y.tolist()))} "
                  f"rho={_rho(state)} rb={res.rollback_reason}", flush=True)
    print("\n| domain (stream order) | n pre-pass | src | adapt | gap | pre acc | >=0.9 share / acc | "
          ">=0.97 share / acc | agree share / acc / disagree acc | agree & >=0.9 share / acc | "
          "source >=0.9 share / acc | pred / true classes |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- | --- | --- |")
    tot = {**dict.fromkeys(KEYS, 0), "pred": set(), "true": set()}
    for dom, c in per.items():
        print(_row(dom, c))
        for k in KEYS:
            tot[k] += c[k]
        tot["pred"] |= c["pred"]
        tot["true"] |= c["true"]
    print(_row("all", tot), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
