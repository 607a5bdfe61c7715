"""Unadapted accuracy of the bundled classifiers on the held-out validation domains under both corruption profiles.

    python scripts/heldout_noadapt.py --val-images 500 > docs/results/r2_heldout_noadapt.md

The held-out domains are those of ``mgg bench --sweep-lrs``: the 4 held-out corruptions at severity 5 of the
validation subset of the MNIST-5k TRAIN split (``bench.data.validation_indices``), per profile.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from mgg_core.bench.data import DEFAULT_CACHE_DIR, _train_size, synthetic_domains, validation_indices
from mgg_core.classifier import default_checkpoint, load_classifier
from mgg_core.data.corruptions import HELDOUT_CORRUPTIONS, PROFILES

__all__ = ["main"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--val-images", type=int, default=500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    vi = validation_indices(_train_size("mnist5k"), args.val_images)
    models = {k: load_classifier(default_checkpoint(k)) for k in ("vit", "resnet")}
    print("| profile | model | " + " | ".join(HELDOUT_CORRUPTIONS) + " | mean |")
    print("| --- | --- |" + " ---: |" * (len(HELDOUT_CORRUPTIONS) + 1))
    for profile in PROFILES:
        doms = synthetic_domains("mnist5k", "train", HELDOUT_CORRUPTIONS, 5, 0, DEFAULT_CACHE_DIR, indices=vi,
                                 profile=profile)
        for kind, clf in models.items():
            accs = []
            for d in doms:
                with torch.no_grad():
                    pred = clf.model(clf.preprocessor(d.images)).argmax(1).numpy()
                accs.append(100.0 * float(np.mean(pred == d.labels)))
            print(f"| {profile} | {kind} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {np.mean(accs):.1f} |")


if __name__ == "__main__":
    main()
