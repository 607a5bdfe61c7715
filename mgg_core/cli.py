"""`mgg` console script: one subcommand per job.

Each subcommand lives in the module that owns the job; that module exposes
``add_parser(subparsers)`` which registers the subcommand and sets ``func``.
Modules are imported lazily so ``mgg --help`` stays fast and a broken optional
dependency only breaks its own subcommand.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from typing import Any

# subcommand -> module that provides add_parser(subparsers)
SUBCOMMANDS: dict[str, str] = {
    "serve": "service.cli",
    "replay": "mgg_replay.cli",
    "train-source": "mgg_core.train_source",
    "data": "mgg_core.data.cli",
    "pretrain": "mgg_core.pretrain",
    "bench": "mgg_core.bench.cli",
}


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None,
                         help: str = "torch CPU threads (1 is fastest for these small models; more threads "
                                     "oversubscribe a busy CPU)") -> None:
    """``--threads``: ``main`` applies it for the job and restores the caller's count afterwards."""
    parser.add_argument("--threads", type=int, default=default, help=help)


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass ``cls`` whose metadata has a ``help``: ``--field-name`` (or
    ``metadata["flag"]``), the field's default, and the other metadata as ``add_argument`` keywords
    (``parse`` excluded: :func:`config_kwargs` applies it). So a job parameter is written once, in its config."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kw = {k: v for k, v in f.metadata.items() if k not in ("flag", "parse")}
        if f.default is not dataclasses.MISSING and kw.get("action") not in ("store_true", "store_false"):
            kw["default"] = list(f.default) if isinstance(f.default, tuple) else f.default
        parser.add_argument(f.metadata.get("flag", "--" + f.name.replace("_", "-")), dest=f.name, **kw)


def config_kwargs(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``cls`` that :func:`add_config_arguments` put on ``args``."""
    out = {}
    for f in dataclasses.fields(cls):
        if "help" in f.metadata and hasattr(args, f.name):
            parse = f.metadata.get("parse")
            value = getattr(args, f.name)
            out[f.name] = parse(value) if parse else value
    return out


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mgg", description="MGG test-time adaptation: library, service and tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see `mgg {name} --help`)")
            continue
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    if only is None and argv and not argv[0].startswith("-"):
        print(f"mgg: unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    parser = build_parser(only)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    import torch  # every job uses it; jobs may set the CPU thread count, which is restored for in-process callers

    threads = torch.get_num_threads()
    try:
        if getattr(args, "threads", None):
            torch.set_num_threads(args.threads)
        result = args.func(args)
    finally:
        torch.set_num_threads(threads)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
