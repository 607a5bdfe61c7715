#!/usr/bin/env python
"""Write the sample PNGs that README's first curl example posts: the first test image of a few classes of the bundled
MNIST-5k (28x28 grayscale, fixed split), as ``docs/samples/digit<class>.png``.

    .venv/bin/python scripts/make_sample_images.py            # digits 0, 1 and 7 into docs/samples/
    .venv/bin/python scripts/make_sample_images.py --digits 3 5 --out /tmp/samples

The output is deterministic (same pixels, same PNG bytes for a given Pillow), so re-running it changes nothing.
"""
from __future__ import annotations

import argparse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    from mgg_core.data.sources import mnist5k
    from mgg_core.io import atomic_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--digits", type=int, nargs="+", default=[0, 1, 7], help="classes to write (default 0 1 7)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "samples", help="output folder")
    args = p.parse_args(argv)
    source = mnist5k("test")
    for digit in args.digits:
        index = int((source.labels == digit).nonzero()[0][0])
        path = args.out / f"digit{digit}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(source.images[index]).save(tmp, format="PNG", optimize=True)
        print(f"{path}: test image {index}, label {digit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
