"""Held-out streams for choosing the guard's and the small-batch engine's settings (never the test streams).

The data is what ``mgg bench`` chooses step sizes on: the held-out validation subset of the MNIST-5k TRAIN split
(``mgg_core.bench.data.validation_indices``, images the classifiers never trained on) corrupted with the 4 held-out
corruptions (speckle_noise, spatter, gaussian_blur, saturate), none of which is in the 15 test corruptions. To
have domains where the source is good (where adaptation can only hurt) as well as domains where it is bad, each
corruption comes in three forms: ImageNet-C constants at severity 5 and 3, and CIFAR-10-C constants at severity 5
(12 domains).

Two stream kinds, mirroring the two test protocols of issue 9:

* ``continual``: the 12 domains in a seeded shuffled order (seed 1; the test stream uses 0), ``--images`` images
  per domain, batch 16, never reset, i.i.d. or Dirichlet(alpha) label shift within a domain;
* ``replay``: 6 of the domains (seeded choice; ``--replay-domains``), 64 images each, one stream, never reset,
  cut into requests of 64, 16, 4 and 1 images.

Variants are the service's default engine with overrides, e.g.::

    nice -n 10 .venv/bin/python scripts/smallbatch_heldout.py --kind continual --models resnet vit \
        --variant base={} --variant hold128='{"guard": {"hold_images": 128}}'

Prints one line per (model, stream, variant): mean accuracy of no adaptation and of the variant, worst per-domain
gap and the fallbacks; ``--json`` keeps everything.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smallbatch_continual import run as run_continual
from smallbatch_sweep import engine_variant, load_default_runtime
from smallbatch_sweep import run as run_replay

#: (profile, severity) forms of each held-out corruption
FORMS = (("imagenet-c", 5), ("imagenet-c", 3), ("cifar-c", 5))
CACHE = Path(os.environ.get("MGG_CACHE_DIR", Path.home() / ".cache" / "mgg"))


def heldout_domains(images: int, seed: int = 1) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, uint8 images, labels) of the 12 held-out domains, ``images`` validation images each (one seeded
    class-mixed subset, the same in every domain, in a per-domain seeded order)."""
    from mgg_core.bench.data import _train_size, synthetic_domains, validation_indices
    from mgg_core.data.corruptions import HELDOUT_CORRUPTIONS

    vi = validation_indices(_train_size("mnist5k"))
    sub = np.sort(np.random.default_rng([seed, 7]).permutation(vi)[:images])
    out = []
    for profile, sev in FORMS:
        for d in synthetic_domains("mnist5k", "train", HELDOUT_CORRUPTIONS, sev, seed, CACHE, indices=sub,
                                   profile=profile, tag_profile=True):
            assert d.images is not None        # synthetic domains are generated in memory
            out.append((d.name, d.images, d.labels))
    return out


def order_stream(domains, label_shift: float | None, seed: int = 1):
    """The domains in a seeded shuffled order, each one's samples i.i.d. or Dirichlet-ordered."""
    from mgg_core.data.streams import dirichlet_order

    rng = np.random.default_rng([seed, 0xC0417])
    out = []
    for k in rng.permutation(len(domains)):
        name, x, y = domains[k]
        perm = rng.permutation(len(y)) if label_shift is None else dirichlet_order(y, label_shift, rng)
        out.append((name, x[perm], y[perm]))
    return out


def continual_batches(stream, preprocessor, batch_size: int = 16):
    return [(name, preprocessor(x[i:i + batch_size]), torch.as_tensor(y[i:i + batch_size]))
            for name, x, y in stream for i in range(0, len(y), batch_size)]


def _variant(rt, overrides: dict):
    o = dict(overrides)
    if "guard" in o:
        o["guard"] = dataclasses.replace(rt.engine.config.guard, **o["guard"])
    return engine_variant(rt, **o)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["continual", "replay"], default="continual")
    p.add_argument("--models", nargs="+", default=["resnet", "vit"])
    p.add_argument("--label-shift", nargs="+", default=["none", "0.1"])
    p.add_argument("--images", type=int, default=200, help="images per domain (continual)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[64, 16, 4, 1])
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=JSON of EngineConfig overrides ('guard' takes GuardConfig overrides)")
    p.add_argument("--replay-domains", type=int, default=6,
                   help="held-out domains in the replay stream (seeded choice of the 12; 12: all of them)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    variants = dict(v.split("=", 1) for v in args.variant) or {"default": "{}"}
    record: dict = {"args": vars(args), "results": {}}
    for model in args.models:
        rt = load_default_runtime(model)
        if args.kind == "continual":
            doms = heldout_domains(args.images, args.seed)
            for shift in args.label_shift:
                alpha = None if shift == "none" else float(shift)
                batches = continual_batches(order_stream(doms, alpha, args.seed), rt.preprocessor)
                base = run_continual(engine_variant(rt, method="noadapt"), batches)
                for name, js in variants.items():
                    res = run_continual(_variant(rt, json.loads(js)), batches)
                    gaps = {d: res["per_domain"][d] - base["per_domain"][d] for d in base["per_domain"]}
                    worst = min(gaps, key=lambda d: gaps[d])
                    print(f"{model:6s} shift={shift:4s} {name:12s} noadapt={base['mean']:.1f} "
                          f"adapted={res['mean']:.1f} worst={gaps[worst]:+.1f} ({worst}) "
                          f"fallbacks={res['fallbacks']} {res['seconds']:.0f}s", flush=True)
                    record["results"][f"{model}/{shift}/{name}"] = {"noadapt": base, "adapted": res}
        else:
            doms = heldout_domains(64, args.seed)
            pick = np.random.default_rng([args.seed, 3]).permutation(len(doms))[:args.replay_domains]
            stream = [(n, rt.preprocessor(x), torch.as_tensor(y)) for n, x, y in
                      order_stream([doms[k] for k in pick], None, args.seed)]
            base = run_replay(engine_variant(rt, method="noadapt"), stream, 64)
            for name, js in variants.items():
                eng = _variant(rt, json.loads(js))
                row = {b: run_replay(eng, stream, b, 0) for b in args.batch_sizes}
                cells = " ".join(f"b{b}={row[b]['accuracy']:.1f}(rb{row[b]['rollbacks']}"
                                 f"/rel{row[b].get('hold_releases', 0)})" for b in args.batch_sizes)
                print(f"{model:6s} replay {name:12s} noadapt={base['accuracy']:.1f} {cells}", flush=True)
                record["results"][f"{model}/replay/{name}"] = {"noadapt": base, **{str(b): r for b, r in row.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
