"""Timing check for the content-keyed corrupted-image cache of ``mgg bench`` (docs/custom-data.md).

Generates a small folder dataset (tests/test_custom_data.py's generator, 3 classes x N images), trains a tiny source
classifier, then times ``mgg bench --methods noadapt`` over the 15 test corruptions three times: cold cache, the
same folder again, and a copy of the folder at another path (same files, sizes, mtimes). Prints the wall times and
the ratios; a path-keyed cache would make the third run as slow as the first.

    HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python scripts/byod_cache_reuse.py --per-class 200
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_custom_data import write_folder

from mgg_core.cli import main as mgg


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_folder(root / "a" / "shapes", args.per_class, seed=0)
        clf = root / "clf.safetensors"
        mgg(["train-source", "--data", str(data), "--model", "test_resnet", "--out", str(clf), "--epochs", "2",
             "--threads", "1", "--quiet"])
        moved = shutil.copytree(data, root / "b" / "shapes", copy_function=shutil.copy2)
        times = []
        for i, d in enumerate((data, data, moved)):
            t0 = time.perf_counter()
            mgg(["bench", "--classifier", str(clf), "--data", str(d), "--methods", "noadapt", "--cache-dir",
                 str(root / "cache"), "--out", str(root / f"out{i}"), "--no-progress", "--quiet"])
            times.append(time.perf_counter() - t0)
        n = len(list((root / "cache").glob("*.npz")))
    print(f"cold {times[0]:.1f}s, same folder {times[1]:.1f}s, moved copy {times[2]:.1f}s; cache files {n}; "
          f"ratios warm/cold {times[1] / times[0]:.2f}, moved/cold {times[2] / times[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
