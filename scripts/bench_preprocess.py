"""Preprocessor throughput (was the timing assertion ``test_preprocessor_is_fast``; timings belong here, not in tests).

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/bench_preprocess.py [--images 1000] [--repeats 5]

Prints images/s of the bundled ResNet's ``Preprocessor`` on MNIST-5k test images (uint8 arrays, the service's
path), and the ratio to a bare ``torch`` reference of the same work (resize + normalise on a float tensor) measured
in the same run, so the number is comparable across machines. The old test's floor was 1000 images/s.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from mgg_core.classifier import ClassifierCard, default_checkpoint
from mgg_core.data.sources import mnist5k
from mgg_core.preprocess import Preprocessor


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    card = ClassifierCard.load(default_checkpoint("resnet").with_suffix(".json"))
    pre = Preprocessor(card.data_config())
    imgs = mnist5k("test").images[: args.images]
    _, h, w = pre.input_size
    mean = torch.tensor(pre.data_config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pre.data_config["std"]).view(1, -1, 1, 1)

    def reference() -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(imgs)).float().div_(255).unsqueeze(1).expand(-1, 3, -1, -1)
        return (F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False) - mean) / std

    t_pre = _best(lambda: pre(imgs), args.repeats)
    t_ref = _best(reference, args.repeats)
    print(f"preprocessor: {len(imgs) / t_pre:,.0f} images/s  (best of {args.repeats}, {len(imgs)} images)")
    print(f"torch reference: {len(imgs) / t_ref:,.0f} images/s")
    print(f"ratio preprocessor/reference time: {t_pre / t_ref:.2f}")


if __name__ == "__main__":
    main()
