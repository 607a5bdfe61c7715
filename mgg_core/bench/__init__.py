"""`mgg bench`: methods x corruptions over one online stream (a StreamSpec); table, JSON protocol and plot.

    mgg bench --classifier vit --out docs/results/vit_reset --sweep-lrs 1e-3,3e-3,1e-2,3e-2,1e-1,3e-1,1
    mgg bench --classifier vit --out docs/results/vit_continual --reset never \
              --sweep-from docs/results/vit_reset/results.json
    mgg bench --data /data/imagenet-c --model vit_base_patch16_224 --weights vit.safetensors \
              --clean-data /data/imagenet/train --mgg-checkpoint mgg_vitb.safetensors --device cuda \
              --lr tent=1e-3 eata=1e-3 sar=1e-3 deyo=1e-3 foa=1e-3 mgg=1e-3 --out runs/in-c    # ImageNet-C

Protocol (defaults): the 15 ImageNet-C test corruptions at severity 5 of the source's TEST split, batch 64, one
online pass, predictions made before each update, the stream reset to source at every corruption boundary
(``--reset per_domain``) or never (``--reset never``, continual); any sequential StreamSpec via ``--stream``.
Every method sees exactly the same batches (the spec's seeded order). Methods: noadapt, bn (BatchNorm models
only), tent, eata, sar, deyo, foa (FOA loss + SGD) and mgg (FOA loss + the MGG optimizer): every registered
method with SGD, plus every optimizer that declares a bench method (see ``--methods``).

Data: ``--data`` is 'mnist5k' or a dataset folder DIR/<class>/<image> (its TEST split corrupted on the fly and
cached), or a tree of domain folders with any names, DIR/<domain>/<class>/<image> or
DIR/<domain>/<severity>/<class>/<image> (make-c output, ImageNet-C, your own shifts); without ``--data`` the data
named by the classifier's card (never MNIST-5k for a classifier of other data). See docs/custom-data.md.

Learning rates are NEVER chosen on the test domains: ``--sweep-lrs`` runs every gradient method over the same grid
on held-out data, streamed with the test stream's reset policy, and picks each method's best: ``--sweep-data`` (a
tree of your own held-out shifts) or, by default, the 4 held-out corruptions (speckle_noise, spatter,
gaussian_blur, saturate) of a validation subset of the clean TRAIN split behind the data (the folder itself, a
make-c tree's manifest, or the classifier card). The sweep is recorded in the JSON (``--sweep-from`` reuses a
recorded one, ``--lr METHOD=LR`` sets one explicitly). EATA's Fisher comes from ``--clean-data`` or that clean
TRAIN split; without either the run says so in a WARNING line and in the protocol.

Results are cached per (method, domain) under ``OUT/cache`` (continual streams also keep the stream-state
snapshot after each domain), keyed by a protocol fingerprint, so an interrupted run resumes where it stopped.
Corrupted images are generated once into ``--cache-dir`` (uint8 npz per domain, the pixels of ``mgg data make-c``),
keyed by the dataset's content (file list, sizes, mtimes), not its path. Progress: short lines on stderr (a live
bar on a terminal) and one line per finished (method, domain), with ``--no-progress`` too.
Updates-to-reference: the first batch from which a method's online accuracy curve reaches TENT's final online
accuracy and stays there.
"""
from __future__ import annotations

from .data import (
                   DEFAULT_CACHE_DIR,
                   VAL_IMAGES,
                   Domain,
                   PreparedDomain,
                   corrupted_images,
                   load_any_classifier,
                   stream_domains,
                   synthetic_domains,
                   validation_indices,
)
from .report import batches_to_reach, markdown_table, online_curve, plot_curves, summarize
from .runner import (
                   ALL_METHODS,
                   BENCH_METHODS,
                   DEFAULT_METHODS,
                   DEFAULT_SWEEP,
                   METHOD_PARTS,
                   REFERENCE_LR,
                   BenchConfig,
                   BenchMethod,
                   DomainResult,
                   ResultCache,
                   Setup,
                   bench,
                   build_engine,
                   run_bench,
                   run_domain,
                   run_stream,
                   sweep_lrs,
)

__all__ = ["ALL_METHODS", "BENCH_METHODS", "DEFAULT_CACHE_DIR", "DEFAULT_METHODS", "DEFAULT_SWEEP", "METHOD_PARTS",
           "REFERENCE_LR", "VAL_IMAGES", "BenchConfig", "BenchMethod", "Domain", "DomainResult", "PreparedDomain",
           "ResultCache", "Setup", "batches_to_reach", "bench", "build_engine", "corrupted_images",
           "load_any_classifier", "markdown_table", "online_curve", "plot_curves", "run_bench", "run_domain",
           "run_stream", "stream_domains", "summarize", "sweep_lrs", "synthetic_domains", "validation_indices"]
