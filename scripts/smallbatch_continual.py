"""Long continual streams: all 15 test corruptions in a shuffled order, never reset, in process.

The service's default engine (service/settings.py: EATA + SGD, per-stream BN EMA, 64-image window, guard on)
against no adaptation, per domain, on both bundled models, with and without Dirichlet label shift; engine knobs
can be overridden to compare designs::

    nice -n 10 .venv/bin/python scripts/smallbatch_continual.py --models resnet vit --label-shift none 0.1 \
        --out docs/results/smallbatch_continual

Writes ``<out>/<model>-<shift>.json`` (protocol, per-domain accuracy of no adaptation and of the engine, fallback
counts, and per-batch signals for guard research) and prints one line per run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smallbatch_sweep import _parse_set, engine_variant, load_default_runtime


def continual_spec(label_shift: float | None, seed: int = 0, batch_size: int = 16, limit: int | None = None):
    from mgg_core.data.corruptions import TEST_CORRUPTIONS
    from mgg_core.data.streams import StreamSpec

    rng = np.random.default_rng([seed, 0xC0417])
    order = [TEST_CORRUPTIONS[k] for k in rng.permutation(len(TEST_CORRUPTIONS))]
    return StreamSpec(domains=[(c, 5) for c in order], order="sequential", batch_size=batch_size, reset="never",
                      label_shift=label_shift, seed=seed, limit=limit, data="mnist5k", split="test")


def load_batches(spec, preprocessor):
    from mgg_core.data.streams import iter_batches, open_stream_source

    source = open_stream_source(spec)
    return [(b.domains[0], preprocessor(np.asarray(b.images)), torch.as_tensor(np.asarray(b.labels)))
            for b in iter_batches(spec, source)]


def run(engine, batches, signals: bool = False) -> dict:
    state = engine.new_state(seed=0)
    per: dict[str, list[int]] = {}
    log: list[dict] = []
    fallbacks: dict[str, int] = {}
    t0 = time.perf_counter()
    for dom, x, y in batches:
        res = engine.step(state, x)
        pred = res.logits.argmax(1)
        c = per.setdefault(dom, [0, 0])
        c[0] += int((pred == y).sum())
        c[1] += len(y)
        if res.rolled_back:
            fallbacks[str(res.rollback_reason)] = fallbacks.get(str(res.rollback_reason), 0) + 1
        if res.hold_released is not None:
            key = f"released:{res.hold_released}"
            fallbacks[key] = fallbacks.get(key, 0) + 1
        if signals:
            src = engine.source_predict(x).cpu()
            sp = src.softmax(1)
            log.append({"d": dom, "a": int((pred == y).sum()), "s": int((sp.argmax(1) == y).sum()), "n": len(y),
                        "agree": int((pred == sp.argmax(1)).sum()), "rb": int(res.rolled_back),
                        "conf_n": int((sp.max(1).values >= 0.9).sum()),
                        "conf_agree": int(((pred == sp.argmax(1)) & (sp.max(1).values >= 0.9)).sum()),
                        "ent": res.batch_entropy, "guard": dict(getattr(res, "guard", None) or {})})
    acc = {d: 100.0 * c / n for d, (c, n) in per.items()}
    return {"per_domain": acc, "mean": float(np.mean(list(acc.values()))), "fallbacks": fallbacks,
            "seconds": time.perf_counter() - t0, "signals": log}


def write_tables(out: Path, command: str) -> None:
    """``README.md`` under ``out``: one per-domain table per ``<model>-<shift>.json`` found there."""
    from mgg_core.io import atomic_write_text

    lines = ["# Long continual streams: default service engine vs no adaptation", "",
             f"Command: `{command}`", "",
             "All 15 test corruptions (severity 5) of the MNIST-5k test split in one seeded shuffled order "
             "(images per domain: the stream spec's `limit` in each JSON, all 1000 when null), batch 16, never reset; "
             "i.i.d. within a domain, or Dirichlet(0.1) label shift. "
             "Accuracy (%) of the predictions made before each update. Engine: the service's default configuration "
             "(see each JSON's `protocol.engine`).", ""]
    for path in sorted(out.glob("*.json")):
        rec = json.loads(path.read_text())
        base, ad = rec["noadapt"]["per_domain"], rec["adapted"]["per_domain"]
        gaps = {d: ad[d] - base[d] for d in base}
        limit = rec["protocol"]["stream_spec"].get("limit")
        lines += [f"## {path.stem} ({limit or 1000} images per domain)", "",
                  f"mean: no adaptation {rec['noadapt']['mean']:.1f}, default engine {rec['adapted']['mean']:.1f}; "
                  f"worst domain gap {min(gaps.values()):+.1f}; guard fallbacks {rec['adapted']['fallbacks'] or 0}", "",
                  "| domain | no adaptation | default engine | gap |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {d} | {base[d]:.1f} | {ad[d]:.1f} | {gaps[d]:+.1f} |" for d in base]
        lines.append("")
    atomic_write_text(out / "README.md", "\n".join(lines))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet", "vit"])
    p.add_argument("--label-shift", nargs="+", default=["none", "0.1"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="images per domain (default: all 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", help="EngineConfig override KEY=JSON (repeatable)")
    p.add_argument("--guard", default=None, help="GuardConfig overrides as JSON")
    p.add_argument("--signals", action="store_true", help="log per-batch source-agreement signals")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    for model in args.models:
        rt = load_default_runtime(model)
        overrides = _parse_set(args.set)
        if args.guard:
            overrides["guard"] = dataclasses.replace(rt.engine.config.guard, **json.loads(args.guard))
        for shift in args.label_shift:
            alpha = None if shift == "none" else float(shift)
            spec = continual_spec(alpha, args.seed, args.batch_size, args.limit)
            batches = load_batches(spec, rt.preprocessor)
            base = run(engine_variant(rt, method="noadapt"), batches)
            eng = engine_variant(rt, **overrides)
            res = run(eng, batches, args.signals)
            worst = min(res["per_domain"][d] - base["per_domain"][d] for d in base["per_domain"])
            print(f"{model:6s} shift={shift:4s} noadapt={base['mean']:.1f} adapted={res['mean']:.1f} "
                  f"worst_gap={worst:+.1f} fallbacks={res['fallbacks']} {res['seconds']:.0f}s "
                  f"{json.dumps({k: str(v) for k, v in overrides.items()})}", flush=True)
            if args.out:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                record = {"protocol": {"stream_spec": spec.to_dict(), "model": model, "engine": eng.describe(),
                                       "torch": torch.__version__}, "noadapt": base, "adapted": res}
                (out / f"{model}-{shift}.json").write_text(json.dumps(record, indent=1, default=str))
                write_tables(out, "nice -n 10 .venv/bin/python scripts/smallbatch_continual.py "
                             + " ".join(argv if argv is not None else sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
