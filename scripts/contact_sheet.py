"""Contact sheet of the corruption profiles: every corruption at one severity on a few MNIST-5k test digits.

    python scripts/contact_sheet.py --out docs/corruptions_severity5.png            # both profiles, severity 5

Rows: digits x profiles (clean first column); columns: the 19 corruptions (15 test, then 4 held-out).
The pixels are exactly those of ``corrupt_image(image, c, s, seed, index, profile)`` (the benchmark's).
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from mgg_core.data.corruptions import ALL_CORRUPTIONS, PROFILES, corrupt_image, prepare_image
from mgg_core.data.sources import mnist5k
from mgg_core.io import atomic_path

__all__ = ["contact_sheet"]


def contact_sheet(indices: list[int], severity: int, profiles=PROFILES, scale: int = 2, seed: int = 0) -> Image.Image:
    src = mnist5k("test")
    cell, label_w, head = 32 * scale + 4, 90, 14
    cols = ["clean", *ALL_CORRUPTIONS]
    rows = [(p, i) for p in profiles for i in indices]
    sheet = Image.new("RGB", (label_w + cell * len(cols), head + cell * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, c in enumerate(cols):
        draw.text((label_w + j * cell + 2, 2), c.replace("_", " ")[:11], fill="black")
    for r, (profile, i) in enumerate(rows):
        draw.text((2, head + r * cell + cell // 2 - 6), f"{profile} #{i}", fill="black")
        img = src.get_image(i)
        for j, c in enumerate(cols):
            arr = prepare_image(img) if c == "clean" else corrupt_image(img, c, severity, seed, i, profile=profile)
            tile = Image.fromarray(np.asarray(arr)).resize((32 * scale, 32 * scale), Image.NEAREST)
            sheet.paste(tile, (label_w + j * cell + 2, head + r * cell + 2))
    return sheet


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--severity", type=int, default=5)
    ap.add_argument("--indices", type=int, nargs="+", default=[0, 150, 420, 777])
    args = ap.parse_args(argv)
    with atomic_path(args.out) as tmp:
        contact_sheet(args.indices, args.severity).save(tmp, format="PNG")


if __name__ == "__main__":
    main()
