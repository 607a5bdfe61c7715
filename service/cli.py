"""`mgg serve`: run the adaptation service with uvicorn (one process: stream states live in it), or with
`--backend ray` on Ray Serve (N replicas, each stream pinned to one; see service/rayserve)."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

# flag -> setting name; every flag defaults to None so that unset flags do not mask env vars / config files
_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--host", "host", {"help": "bind address (default 127.0.0.1)"}),
    ("--port", "port", {"type": int, "help": "port (default 8000; 0 = any free port)"}),
    ("--model", "model", {"help": "bundled classifier 'vit' or 'resnet', or a classifier checkpoint .safetensors"}),
    ("--method", "method", {"help": "adaptation method: noadapt, bn, tent, eata, sar, deyo, foa, come, roid "
                                    "(default eata; foa = FOA loss + MGG)"}),
    ("--optimizer", "optimizer", {"help": "sgd, adam or mgg (default: the method's; foa: mgg)"}),
    ("--lr", "lr", {"type": float, "help": "step size (default: the optimizer's)"}),
    ("--mgg-checkpoint", "mgg_checkpoint", {"help": "MGG meta-network checkpoint (default: bundled)"}),
    ("--source-stats", "source_stats", {"help": "FOA source feature statistics (.safetensors)"}),
    ("--source-data", "source_data", {"help": "clean data to compute the source statistics from"}),
    ("--model-name", "model_name", {"help": "model name of the V2 endpoints /v2/models/<name> (default: the "
                                      "classifier card's name)"}),
    ("--device", "device", {"help": "auto (cuda when available), cpu, cuda, cuda:N"}),
    ("--torch-threads", "torch_threads", {"type": int, "help": "torch CPU threads (default: one per core)"}),
    ("--gil-switch-interval-ms", "gil_switch_interval_ms",
     {"type": float, "help": "the interpreter's thread switch interval (default 0.5)"}),
    ("--snapshot-dir", "snapshot_dir", {"help": "per-stream snapshots (default ./mgg-snapshots: in the working dir)"}),
    ("--state-budget-bytes", "state_budget_bytes", {"type": int, "help": "bytes of stream state kept in memory"}),
    ("--idle-seconds", "idle_seconds", {"type": float, "help": "unload streams idle this long"}),
    ("--max-images", "max_images", {"type": int, "help": "images per request"}),
    ("--max-body-bytes", "max_body_bytes", {"type": int, "help": "request body limit"}),
    ("--max-concurrent-streams", "max_concurrent_streams", {"type": int, "help": "engine calls at once "
                                                                                  "(a fused step counts once)"}),
    ("--max-batch-delay-ms", "max_batch_delay_ms", {"type": float, "help": "fused steps: longest wait for other "
                                                    "streams' requests (0 = run what is queued now)"}),
    ("--max-batch-images", "max_batch_images", {"type": int, "help": "fused steps: images per fused step"}),
    ("--max-batch-streams", "max_batch_streams", {"type": int, "help": "fused steps: streams per fused step"}),
    ("--max-queue-per-stream", "max_queue_per_stream", {"type": int, "help": "queued requests per stream"}),
    ("--max-queue-total", "max_queue_total", {"type": int, "help": "queued requests in total"}),
    ("--max-request-pixels", "max_request_pixels", {"type": int, "help": "decoded pixels per request"}),
    ("--max-pixels-in-flight", "max_pixels_in_flight", {"type": int, "help": "decoded pixels held at once"}),
    ("--body-timeout-seconds", "body_timeout_seconds", {"type": float, "help": "time to receive a whole body"}),
    ("--body-idle-timeout-seconds", "body_idle_timeout_seconds",
     {"type": float, "help": "longest wait for the next body chunk"}),
    ("--limit-concurrency", "limit_concurrency", {"type": int, "help": "open connections at once (503 past it)"}),
    ("--timeout-keep-alive-seconds", "timeout_keep_alive_seconds",
     {"type": int, "help": "close idle keep-alive connections after this long"}),
    ("--header-timeout-seconds", "header_timeout_seconds",
     {"type": float, "help": "time to receive a request line and headers (408 past it)"}),
    ("--max-header-bytes", "max_header_bytes", {"type": int, "help": "bytes of request headers (431 past it)"}),
    ("--max-headers", "max_headers", {"type": int, "help": "header fields per request (431 past it)"}),
    ("--http-parser", "http_parser", {"choices": ["httptools", "h11"],
                                      "help": "HTTP/1.1 parser (default httptools; h11: pure Python)"}),
    ("--durability", "durability", {"choices": ["step", "interval"],
                                    "help": "step (default): persist before each answer; interval: in the background"}),
    ("--commit-group-max-streams", "commit_group_max_streams",
     {"type": int, "help": "durability step: streams per durable write (group commit; 1 = one write per stream)"}),
    ("--max-streams", "max_streams", {"type": int, "help": "streams known at once"}),
    ("--max-snapshot-bytes", "max_snapshot_bytes", {"type": int, "help": "bytes of snapshots on disk"}),
    ("--admin-token", "admin_token", {"help": "Bearer token for /reset and /streams (prefer MGG_ADMIN_TOKEN); "
                                      "generated and printed when binding beyond loopback without one"}),
    ("--log-level", "log_level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP adaptation service",
        description="Run the FastAPI adaptation service. Settings come from (highest first) these flags, "
        "MGG_* environment variables, a .env file, the --config file, then defaults.",
    )
    p.add_argument("--config", help="settings file: .env, .yaml/.yml or .json")
    for flag, dest, kw in _FLAGS:
        metavar = None if "choices" in kw else dest.upper()  # `--host HOST`, not argparse's `--host OPT_HOST`
        p.add_argument(flag, dest=f"opt_{dest}", default=None, metavar=metavar, **kw)
    guard = p.add_mutually_exclusive_group()
    guard.add_argument("--collapse-guard", dest="opt_collapse_guard", action="store_true", default=None)
    guard.add_argument("--no-collapse-guard", dest="opt_collapse_guard", action="store_false")
    post = p.add_mutually_exclusive_group()
    post.add_argument("--post-update-predictions", dest="opt_return_post_update", action="store_true", default=None,
                      help="return predictions made after the update")
    post.add_argument("--pre-update-predictions", dest="opt_return_post_update", action="store_false")
    fused = p.add_mutually_exclusive_group()
    fused.add_argument("--fused-steps", dest="opt_fused_steps", action="store_true", default=None,
                       help="run concurrent requests of different streams as one fused step (default)")
    fused.add_argument("--no-fused-steps", dest="opt_fused_steps", action="store_false",
                       help="one engine call per request")
    p.add_argument("--print-settings", action="store_true", help="print the resolved settings and exit")
    from .rayserve.cli import add_ray_flags  # imports no Ray: the flags exist without the extra

    add_ray_flags(p)
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace):
    from .settings import load_settings

    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    return load_settings(args.config, **overrides)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import create_app
    from .server import uvicorn_options

    try:
        settings = settings_from_args(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"mgg serve: {exc}", file=sys.stderr)
        return 2
    if args.print_settings:
        print(settings.model_dump_json(indent=2))
        if args.backend != "ray":
            return 0
    if args.backend == "ray":  # N replicas on Ray Serve, streams pinned by id (service/rayserve)
        from .rayserve.cli import run_ray

        return run_ray(args, settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = f"http://{settings.host}:{settings.port}"
    print(f"mgg serve: {settings.model} / {settings.method} + {settings.optimizer or 'default optimizer'} "
          f"on device {settings.device}; snapshots in {settings.snapshot_dir}", flush=True)
    print(f"mgg serve: API docs at {base}/docs (OpenAPI: {base}/openapi.json); readiness at {base}/readyz",
          flush=True)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, workers=1,
                timeout_graceful_shutdown=30, **uvicorn_options(settings))
    return 0
