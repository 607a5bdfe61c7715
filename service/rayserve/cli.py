"""Flags of ``mgg serve --backend ray`` (added to the serve parser by :mod:`service.cli`) and its entry point.

Every flag defaults to None so that unset flags do not mask ``MGG_RAY_*`` environment variables.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

# flag -> RaySettings field
RAY_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--ray-address", "address", {"help": "Ray cluster to join ('auto', host:6379, ray://host:10001); "
                                  "default: start a local one"}),
    ("--ray-num-cpus", "num_cpus", {"type": int, "help": "CPUs of the local Ray cluster (default: all)"}),
    ("--replicas", "replicas", {"type": int, "help": "shard replicas (engine + stream store each; default 2)"}),
    ("--min-replicas", "min_replicas", {"type": int, "help": "autoscaling lower bound"}),
    ("--max-replicas", "max_replicas", {"type": int, "help": "autoscaling upper bound (enables autoscaling)"}),
    ("--target-ongoing-requests", "target_ongoing_requests", {"type": float, "help": "autoscaling target"}),
    ("--replica-num-cpus", "replica_num_cpus", {"type": float, "help": "CPUs reserved per replica (default 1)"}),
    ("--replica-num-gpus", "replica_num_gpus", {"type": float, "help": "GPUs reserved per replica (default 0)"}),
]


def add_ray_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve backend (--backend ray; pip install .[ray])")
    g.add_argument("--backend", choices=["uvicorn", "ray"], default="uvicorn",
                   help="uvicorn: one process (default); ray: N replicas on a Ray cluster, streams pinned by id")
    for flag, dest, kw in RAY_FLAGS:
        g.add_argument(flag, dest=f"ray_{dest}", default=None, metavar=dest.upper(), **kw)


def ray_settings_from_args(args: argparse.Namespace) -> Any:
    from .settings import RaySettings

    return RaySettings(**{k[4:]: v for k, v in vars(args).items() if k.startswith("ray_") and v is not None})


def run_ray(args: argparse.Namespace, settings: Any) -> int:
    """Validate the Ray settings, then deploy and block (``mgg serve --backend ray``)."""
    from pydantic import ValidationError

    try:
        ray_settings = ray_settings_from_args(args)
    except ValidationError as exc:
        print(f"mgg serve: {exc}", file=sys.stderr)
        return 2
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        print("mgg serve: --backend ray needs Ray Serve: pip install '.[ray]' (or scripts/setup.sh --with-ray)",
              file=sys.stderr)
        return 2
    if getattr(args, "print_settings", False):
        print(ray_settings.model_dump_json(indent=2))
        return 0
    from .app import serve_forever

    return serve_forever(settings, ray_settings)


__all__ = ["add_ray_flags", "ray_settings_from_args", "run_ray", "RAY_FLAGS"]
