"""``mgg bench``: the command line of :class:`~mgg_core.bench.runner.BenchConfig` plus the stream options.

The job's flags are built from the config's fields (``mgg_core.cli.add_config_arguments``); the stream flags build
a :class:`~mgg_core.data.streams.StreamSpec` (or ``--stream`` gives one as JSON).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_config_arguments, add_threads_argument, config_kwargs
from ..data.cli import expand_corruptions
from ..data.streams import StreamSpec
from . import __doc__ as BENCH_DOC
from .runner import BenchConfig, run_bench

__all__ = ["add_parser", "spec_from_args"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark TTA methods over corrupted streams (table, JSON, plot)",
                              description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, BenchConfig)
    g = p.add_argument_group("stream (ignored with --stream)")
    g.add_argument("--stream", default=None,
                   help="a StreamSpec as JSON text or a .json file (overrides the stream options below)")
    g.add_argument("--data", default="mnist5k",
                   help="'mnist5k' (corruptions generated once and cached) or an ImageNet-C tree "
                        "ROOT/<corruption>/<severity>/<class>/")
    g.add_argument("--split", default="test")
    g.add_argument("--corruptions", nargs="+", default=["test"], metavar="NAME",
                   help="corruption names, or 'test' (the 15), 'heldout' (4)")
    g.add_argument("--severity", type=int, default=5)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--reset", choices=("per_domain", "never"), default="per_domain",
                   help="'per_domain': reset at every corruption; 'never': continual")
    g.add_argument("--label-shift", type=float, default=None, help="Dirichlet alpha (non-i.i.d. order)")
    g.add_argument("--limit", type=int, default=None, help="images per domain (seeded, class-stratified subset)")
    g.add_argument("--seed", type=int, default=0)
    add_threads_argument(p, default=1)
    p.set_defaults(func=_run)
    return p


def spec_from_args(args: argparse.Namespace) -> StreamSpec:
    if args.stream:
        is_file = args.stream.endswith(".json") and Path(args.stream).is_file()
        return StreamSpec.from_json(Path(args.stream).read_text() if is_file else args.stream)
    return StreamSpec(domains=[(c, args.severity) for c in expand_corruptions(args.corruptions)], order="sequential",
                      batch_size=args.batch_size, reset=args.reset, label_shift=args.label_shift, seed=args.seed,
                      limit=args.limit, data=args.data, split=args.split)


def _run(args: argparse.Namespace) -> int:
    run_bench(BenchConfig(spec=spec_from_args(args), **config_kwargs(BenchConfig, args)))
    return 0
