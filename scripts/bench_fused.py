#!/usr/bin/env python
"""Fused multi-stream steps (``AdaptationEngine.step_many``) vs the same requests stepped one by one (issue 10).

In process, the service's default engine (built as ``service.runtime.load_runtime`` builds it from default
``ServiceSettings``; ``--model`` picks the bundled classifier). For each shape S x b (S streams, b images per
request), every round sends one request per stream: fused = one ``step_many`` call for the round, separate = S
``step`` calls; fused is measured twice, with the engine's two paths for a group of streams (segment-wise norm
layers over one plain batch, ``mgg_core/segments.py``; and the generic ``torch.func.vmap`` path); beside them the
big-batch reference: 2 streams of 64-image requests stepped one by one. Each mode starts from fresh streams and
takes the same images (noisy MNIST-5k test digits); the modes alternate block by block and each rate is the median
over its blocks (the machine is shared). Measured for the service default (update_images = 64: most requests only
accumulate their gradient) and for update_images = 1. Also records the share of each mode's requests the collapse
guard held at the source (gradient-free, so cheaper: ``--guard off`` compares modes that all compute gradients).
Prints img/s and ratios; writes markdown + JSON with the protocol under ``--out``.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/bench_fused.py --model resnet --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402


def parse_shape(text: str) -> tuple[int, int]:
    s, b = text.lower().split("x")
    return int(s), int(b)


def test_images(rt, n: int, seed: int = 0, noise: float = 0.5) -> torch.Tensor:
    """``n`` preprocessed MNIST-5k test digits with Gaussian noise (a shift the default method adapts to)."""
    import numpy as np

    from mgg_core.data.sources import mnist5k

    src = mnist5k("test")
    idx = np.random.default_rng(seed).permutation(len(src))[:n]
    x = rt.preprocessor(np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8))
    return x + noise * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


class Mode:
    """One way of serving ``streams`` streams of ``batch``-image requests, from fresh streams. ``path``: the fused
    groups' forward ("segment": one plain batch with segment-wise norm layers, where the model allows; "vmap")."""

    def __init__(self, engine, pool: torch.Tensor, streams: int, batch: int, fused: bool,
                 path: str = "segment") -> None:
        self.engine, self.pool, self.streams, self.batch, self.fused = engine, pool, streams, batch, fused
        self.path = path
        self.states = [engine.new_state(seed=s) for s in range(streams)]
        self.round = 0
        self.rates: list[float] = []
        self.outcomes: Counter[str] = Counter()

    def _requests(self) -> list[torch.Tensor]:
        n_pool, out = self.pool.shape[0], []
        for s in range(self.streams):
            start = ((self.round * self.streams + s) * self.batch) % (n_pool - self.batch)
            out.append(self.pool[start:start + self.batch])
        self.round += 1
        return out

    def run(self, rounds: int, timed: bool = True) -> None:
        """``rounds`` rounds of one request per stream: one ``step_many`` per round, or one ``step`` per request."""
        # the engine's switch between its two fused paths (EngineConfig.segment_norms, read at construction)
        self.engine.segment_fused = self.path == "segment" and self.engine.segments.supported
        results = []
        t0 = time.perf_counter()
        for _ in range(rounds):
            xs = self._requests()
            if self.fused:
                results += self.engine.step_many(list(zip(self.states, xs, strict=True)))
            else:
                for st, x in zip(self.states, xs, strict=True):
                    results.append(self.engine.step(st, x))
        if timed:
            self.rates.append(rounds * self.streams * self.batch / (time.perf_counter() - t0))
        # what the requests did: a gradient (none = an update, accumulating), or forward only (guard_hold, ...)
        self.outcomes.update(str(r.skipped_reason or "none") for r in results)

    def summary(self) -> dict:
        return {"streams": self.streams, "batch": self.batch, "fused": self.fused, "rounds": self.round,
                "img_per_s": statistics.median(self.rates), "img_per_s_blocks": self.rates,
                "updates": sum(st.step for st in self.states), "outcomes": dict(self.outcomes),
                "held_share": self.outcomes["guard_hold"] / max(1, sum(self.outcomes.values()))}


def race(modes: list[Mode], images: int, blocks: int) -> None:
    """Alternate the modes block by block (one warm-up round each first), so that load that comes and goes on a
    shared machine hits all of them alike; each mode's rate is the median over its blocks."""
    for m in modes:
        m.run(1, timed=False)
    for _ in range(blocks):
        for m in modes:
            m.run(max(1, images // blocks // (m.streams * m.batch)))


def build_runtime(model: str, update_images: int | None, device: str = "cpu", guard: bool = True):
    from service.runtime import load_runtime
    from service.settings import ServiceSettings

    overrides: dict = {} if update_images is None else {"update_images": update_images}
    if not guard:
        overrides["collapse_guard"] = False
    return load_runtime(ServiceSettings(_env_file=None, model=model, device=device, **overrides))


def measure(args, update_images: int | None) -> dict:
    rt = build_runtime(args.model, update_images, args.device, guard=args.guard == "on")
    torch.set_num_threads(args.threads)      # after load_runtime (torch_threads None leaves torch's default)
    engine = rt.engine
    pool = test_images(rt, 1024).to(engine.device)
    rows = []
    for shape in args.shapes:
        s, b = parse_shape(shape)
        sep, fus, vm, big = (Mode(engine, pool, s, b, False), Mode(engine, pool, s, b, True),
                             Mode(engine, pool, s, b, True, path="vmap"), Mode(engine, pool, 2, 64, False))
        race([sep, fus, vm, big], args.images, args.blocks)
        sep_r, fus_r, vm_r, big_r = sep.summary(), fus.summary(), vm.summary(), big.summary()
        rows.append({"shape": shape, "separate": sep_r, "fused": fus_r, "fused_vmap": vm_r, "big_batch_2x64": big_r,
                     "speedup": fus_r["img_per_s"] / sep_r["img_per_s"],
                     "fused_vs_2x64": fus_r["img_per_s"] / big_r["img_per_s"],
                     "vmap_vs_2x64": vm_r["img_per_s"] / big_r["img_per_s"],
                     "separate_vs_2x64": sep_r["img_per_s"] / big_r["img_per_s"]})
        r = rows[-1]
        print(f"  update_images={engine.update_images:<3} {shape:>5}: separate {sep_r['img_per_s']:6.0f}, fused "
              f"{fus_r['img_per_s']:6.0f}, fused (vmap) {vm_r['img_per_s']:6.0f}, 2x64 {big_r['img_per_s']:6.0f} "
              f"img/s; fused / separate {r['speedup']:.2f}, fused / 2x64 {r['fused_vs_2x64']:.2f}, vmap / 2x64 "
              f"{r['vmap_vs_2x64']:.2f}, separate / 2x64 {r['separate_vs_2x64']:.2f}; held: fused "
              f"{fus_r['held_share']:.0%}, 2x64 {big_r['held_share']:.0%}", flush=True)
    return {"update_images": engine.update_images, "engine": engine.describe(), "fused_engine": engine.fused,
            "segment_norms": engine.segments.supported, "fused_forwards": dict(engine.fused_forwards),
            "fuse_max_images": engine.fuse_max_images, "rows": rows}


def markdown(report: dict) -> str:
    p = report["protocol"]
    lines = [f"# Fused multi-stream steps: {p['model']}", "",
             f"Command: `{p['command']}`", "",
             f"Protocol: model {p['model']} ({p['checkpoint']}), default ServiceSettings engine (method "
             f"{p['method']}, optimizer {p['optimizer']}, bn_stats {p['bn_stats']}, guard check_share "
             f"{p['guard_check_share']}), device {p['device']}, torch {p['torch']}, timm {p['timm']}, "
             f"python {p['python']}, "
             f"{p['threads']} torch thread(s), {p['cpu']}, {p['date']}. Images: MNIST-5k test digits + Gaussian "
             f"noise 0.5 (preprocessed once, outside the timing); each mode starts from fresh streams; one warm-up "
             f"round untimed; about {p['images']} images per mode and shape, in {p['blocks']} blocks that "
             f"alternate the four modes (separate; fused with segment-wise norm layers; fused with the vmap path; "
             f"2 streams x 64 images stepped one by one); rates are medians over the blocks. step_many fuses "
             f"requests of at most {p['fuse_max_images']} images that share their shape (larger ones run as step() "
             f"inside the call). 'held': share of the mode's requests the collapse guard held at the source "
             f"(gradient-free).", ""]
    for block in report["results"]:
        lines += [f"## update_images = {block['update_images']}", "",
                  "| streams x images | separate img/s | fused img/s | fused (vmap) img/s | fused / separate "
                  "| fused / 2x64 | vmap / 2x64 | 2x64 img/s | separate / 2x64 | held fused / 2x64 |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in block["rows"]:
            lines.append(f"| {r['shape']} | {r['separate']['img_per_s']:.0f} | {r['fused']['img_per_s']:.0f} | "
                         f"{r['fused_vmap']['img_per_s']:.0f} | {r['speedup']:.2f} | {r['fused_vs_2x64']:.2f} | "
                         f"{r['vmap_vs_2x64']:.2f} | {r['big_batch_2x64']['img_per_s']:.0f} | "
                         f"{r['separate_vs_2x64']:.2f} | {r['fused']['held_share']:.0%} / "
                         f"{r['big_batch_2x64']['held_share']:.0%} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet", help="bundled classifier (resnet, vit) or a checkpoint path")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu", help="engine device (cpu, cuda, auto)")
    ap.add_argument("--shapes", nargs="+", default=["16x4", "8x8", "2x64"], help="streams x images per request")
    ap.add_argument("--images", type=int, default=1024, help="images per mode and shape (about)")
    ap.add_argument("--blocks", type=int, default=4, help="alternating timed blocks per mode (median taken)")
    ap.add_argument("--update-images", nargs="+", default=["default", "1"],
                    help="gradient windows to measure ('default': the service's)")
    ap.add_argument("--guard", choices=("on", "off"), default="on",
                    help="the collapse guard (service default: on). On this data it holds the 2x64 streams at the "
                    "source (gradient-free) for most requests; off: every mode computes its gradients")
    ap.add_argument("--out", default=str(REPO / "docs" / "results" / "fused"), help="output folder")
    args = ap.parse_args(argv)

    import timm

    from mgg_core.io import atomic_write_text

    results = []
    for u in args.update_images:
        results.append(measure(args, None if u == "default" else int(u)))
    eng = results[0]["engine"]
    from service.settings import ServiceSettings

    defaults = ServiceSettings(_env_file=None)
    protocol = {
        "model": eng["model"], "checkpoint": args.model, "method": eng["method"],
        "optimizer": (eng["optimizer"] or {}).get("name"), "bn_stats": eng["bn_stats"],
        "guard_check_share": defaults.guard_check_share if args.guard == "on" else None, "threads": args.threads,
        "images": args.images,
        "device": args.device, "update_images": [b["update_images"] for b in results], "blocks": args.blocks,
        "fuse_max_images": results[0]["fuse_max_images"],
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "scripts/bench_fused.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report = {"protocol": protocol, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_fused_{Path(args.model).stem}_t{args.threads}" + ("" if args.guard == "on" else "_noguard")
    atomic_write_text(out / f"{stem}.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / f"{stem}.md", markdown(report))
    print(f"wrote {out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
