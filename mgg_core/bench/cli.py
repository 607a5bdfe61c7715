"""``mgg bench``: the command line of :class:`~mgg_core.bench.runner.BenchConfig` plus the stream options.

The job's flags are built from the config's fields (``mgg_core.cli.add_config_arguments``); the stream flags build
a :class:`~mgg_core.data.streams.StreamSpec` (or ``--stream`` gives one as JSON). Without ``--data`` the stream
reads the data named by the classifier's card (never MNIST-5k for a classifier of other data). Errors are one line
on stderr (exit status 1) and leave no empty output folder.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from ..cli import add_config_arguments, add_threads_argument, config_kwargs
from ..data.cli import expand_corruptions
from ..data.imagenet_c import is_domain_tree
from ..data.streams import StreamSpec
from . import __doc__ as BENCH_DOC
from .runner import BenchConfig, run_bench

__all__ = ["add_parser", "spec_from_args", "user_errors"]

#: exceptions that are the user's input (a path, a name, a value), reported as one line without a traceback
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmark TTA methods over corrupted streams (table, JSON, plot)",
                              description=BENCH_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, BenchConfig)
    g = p.add_argument_group("stream (ignored with --stream)")
    g.add_argument("--stream", default=None,
                   help="a StreamSpec as JSON text or a .json file (overrides the stream options below)")
    g.add_argument("--data", default=None,
                   help="'mnist5k' or a dataset folder DIR/<class>/<image> (corrupted on the fly, cached), or a tree "
                        "of domain folders DIR/<domain>/<class>/<image> or DIR/<domain>/<severity>/<class>/<image> "
                        "(any folder names: make-c output, ImageNet-C, your own shifts); default: the data named by "
                        "the classifier's card")
    g.add_argument("--split", default="test")
    g.add_argument("--corruptions", "--domains", dest="corruptions", nargs="+", default=None, metavar="NAME",
                   help="corruption names, 'test' (the 15), 'heldout' (4), 'clean'; for a tree: its domain folder "
                        "names (default: every domain of a tree at --severity, else the 15 test corruptions)")
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


def _card_data(args: argparse.Namespace) -> str:
    """``--data`` when given, else the dataset named by the classifier's card; a clear error otherwise."""
    from ..classifier import DEFAULT_CHECKPOINTS, ClassifierCard, card_path_for, default_checkpoint
    from .data import card_data

    if args.data is not None:
        return str(args.data)
    if getattr(args, "model", None):
        raise ValueError("--model (a plain weights file) has no card naming its data: pass --data")
    ck = default_checkpoint(args.classifier) if args.classifier in DEFAULT_CHECKPOINTS else args.classifier
    card_file = card_path_for(Path(ck))
    if not card_file.is_file():
        raise FileNotFoundError(f"no classifier card {card_file}; pass --data")
    found = card_data(SimpleNamespace(card=ClassifierCard.load(card_file), checkpoint_path=Path(ck)))
    if found is None:
        raise ValueError(f"the card of {ck} names no dataset found on this machine; pass --data")
    return found


def spec_from_args(args: argparse.Namespace) -> StreamSpec:
    if args.stream:
        is_file = args.stream.endswith(".json") and Path(args.stream).is_file()
        d = json.loads(Path(args.stream).read_text() if is_file else args.stream)
        if not isinstance(d, dict):
            raise ValueError("--stream: a StreamSpec JSON object")
        d.setdefault("data", _card_data(args))             # a spec without data: the card's, not MNIST-5k
        return StreamSpec.from_dict(d)
    data = _card_data(args)
    if data != "mnist5k" and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: no such folder (and not 'mnist5k')")
    if data != "mnist5k" and is_domain_tree(data):
        from .data import tree_domains

        domains: list = tree_domains(data, args.corruptions, args.severity)
    else:
        names = expand_corruptions(args.corruptions or ["test"])
        domains = [n if n == "clean" or ("-" in n and n.rpartition("-")[2].isdigit()) else (n, args.severity)
                   for n in names]
    return StreamSpec(domains=domains, order="sequential", batch_size=args.batch_size, reset=args.reset,
                      label_shift=args.label_shift, seed=args.seed, limit=args.limit, data=data, split=args.split)


def user_errors(command: str, run, *args):
    """``run(*args)``, with the user's errors as one line ``mgg <command>: error: ...`` (SystemExit 2)."""
    try:
        return run(*args)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise SystemExit(f"mgg {command}: error: {' '.join(str(msg).split())}") from None


def _run(args: argparse.Namespace) -> int:
    def job() -> int:
        run_bench(BenchConfig(spec=spec_from_args(args), **config_kwargs(BenchConfig, args)))
        return 0
    return user_errors("bench", job)
