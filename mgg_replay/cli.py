"""`mgg replay`: a load client that replays labelled test streams to a running service.

It sends an ImageNet-C layout folder (``DIR/<corruption>/<severity>/<class>/<image>``) or a stream generated
from the embedded MNIST-5k with on-the-fly corruptions (``--data mnist5k-c``) to ``POST /predict`` over N
concurrent streams, each with its own ``X-Stream-Id`` and its own domain order and seed. Because it knows the
labels, it measures what the service cannot: online accuracy (of the predictions the service answered, i.e.
made before each update) per corruption and per stream. It also measures throughput, client-side latency
quantiles and errors by status, and writes three files:

* ``replay.json``  the full protocol (url, data, stream spec, server/model info, versions) and every request
* ``replay.md``    a markdown summary
* ``replay.png``   accuracy and batch entropy over time, one line per stream

Baseline mode (``--baseline``) replays the very same streams with adaptation switched off. The service has no
per-request "do not adapt" switch (adaptation is the point of a stream), so the baseline runs against a server
started with ``MGG_METHOD=noadapt``: ``--baseline-url`` names one that is already running (for example the
``service-noadapt`` of docker-compose.yml), otherwise ``mgg replay --baseline`` starts a local server
(``uvicorn --factory service.app:create_app``) with the same checkpoint as the target server and
``MGG_METHOD=noadapt``, replays, and stops it.
``--compare BASELINE.json`` prints the side-by-side table of this run and a baseline run (``--report`` compares
two existing reports without replaying).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import sys
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .client import DEFAULT_URL, ReplayConfig, Replayer, server_info, server_method, server_model, versions
from .plans import DEFAULT_MNIST_C_CORRUPTIONS, MNIST_C, SpecOptions, build_plans
from .report import REPORT_SCHEMA, compare_table, fmt_num, fmt_pct, load_report, summarize, write_report
from .server import LocalServer, wait_ready
from .v2 import infer_path, served_model

# ------------------------------------------------------------------------------------------------ CLI


def _add_stream_flags(p: argparse.ArgumentParser) -> None:
    """The data and the stream spec: what each stream replays."""
    p.add_argument("--url", default=os.environ.get("MGG_REPLAY_URL", DEFAULT_URL), help="service base URL")
    p.add_argument("--data", default=MNIST_C,
                   help=f"{MNIST_C!r} (embedded MNIST-5k test split, corrupted on the fly), a dataset folder "
                        "DIR/<class>/<image> (its test split corrupted on the fly), or a tree of domain folders with "
                        "any names: DIR/<domain>/<class>/<image> or DIR/<domain>/<severity>/<class>/<image>")
    g = p.add_argument_group("stream spec (mgg_core.data.streams.StreamSpec, one per stream)")
    g.add_argument("--spec", default=None, metavar="SPEC.json",
                   help="a StreamSpec JSON as the base spec (then --corruptions/--severity/--images-per-domain/"
                        "--batch-size/--order/--reset/--label-shift are ignored)")
    g.add_argument("--streams", type=int, default=2, help="concurrent streams, each with its own X-Stream-Id")
    g.add_argument("--corruptions", default=None,
                   help=f"comma-separated domains: 'name' (a corruption, or a tree's domain folder; at --severity "
                        "where it has severities), 'name-severity', or 'clean' (the uncorrupted split) (default: "
                        f"{','.join(DEFAULT_MNIST_C_CORRUPTIONS)} for {MNIST_C}; every domain of a tree)")
    g.add_argument("--severity", type=int, default=5)
    g.add_argument("--profile", choices=("imagenet-c", "cifar-c"), default="imagenet-c",
                   help="corruption constants of on-the-fly domains: imagenet-c (224 px photos) or cifar-c "
                        "(CIFAR-10-C's, for 32 px data)")
    g.add_argument("--images-per-domain", type=int, default=256,
                   help="images per domain per stream (StreamSpec.limit, class-stratified); 0 = all")
    g.add_argument("--batch-size", type=int, default=64, help="images per request")
    g.add_argument("--order", choices=("sequential", "mixed"), default="sequential",
                   help="sequential: domain after domain; mixed: domains interleaved at random")
    g.add_argument("--reset", default="never", metavar="never|per_domain|every:N",
                   help="reset policy within a stream (default never: continual adaptation)")
    g.add_argument("--reset-each-domain", dest="reset", action="store_const", const="per_domain",
                   help="shorthand for --reset per_domain (episodic streams)")
    g.add_argument("--label-shift", type=float, default=None, metavar="ALPHA",
                   help="non-i.i.d. label order (Dirichlet concentration; small = few classes per batch)")
    g.add_argument("--domain-order", choices=("shuffled", "fixed"), default="shuffled",
                   help="shuffled: each stream its own domain order from its seed; fixed: the given order")
    g.add_argument("--seed", type=int, default=0, help="base seed; stream i uses seed + i")
    g.add_argument("--stream-prefix", default=None, help="X-Stream-Id prefix (default: replay-<run id>)")


def _add_transport_flags(p: argparse.ArgumentParser) -> None:
    """Bounds of the run and how requests are sent."""
    b = p.add_argument_group("bounds and transport")
    b.add_argument("--images-per-stream", type=int, default=None, help="stop each stream after this many images")
    b.add_argument("--duration", type=float, default=None, help="stop all streams after this many seconds")
    b.add_argument("--format", dest="fmt", choices=("npy", "png"), default="npy",
                   help="request body: application/x-npy (default) or multipart PNG files")
    b.add_argument("--protocol", choices=("predict", "v2"), default="predict",
                   help="predict: POST /predict with X-Stream-Id (default); v2: the Open Inference Protocol, "
                        "POST /v2/models/<model>/infer with binary tensors, the stream as sequence_id and resets "
                        "as sequence_start (no admin token needed; --format is then ignored)")
    b.add_argument("--model-name", default=None,
                   help="with --protocol v2: the model name (default: the one the server lists in "
                        "/v2/repository/index)")
    b.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    b.add_argument("--max-retries", type=int, default=20, help="retries of a batch answered 429/503")
    b.add_argument("--wait-ready", type=float, default=30.0, help="seconds to wait for the server's /readyz")
    b.add_argument("--no-reset", action="store_true", help="do not reset the streams before replaying")
    b.add_argument("--token", default=os.environ.get("MGG_ADMIN_TOKEN"),
                   help="admin bearer token for /reset (default: $MGG_ADMIN_TOKEN)")
    b.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def _add_comparison_flags(p: argparse.ArgumentParser) -> None:
    """The no-adaptation baseline, comparisons and the output files."""
    m = p.add_argument_group("baseline and comparison")
    m.add_argument("--baseline", action="store_true",
                   help="replay the same streams with adaptation off, against a server with MGG_METHOD=noadapt: "
                        "--baseline-url, else --url when it already runs noadapt, else a local server "
                        "subprocess with the model of --url")
    m.add_argument("--baseline-url", default=None, help="a running noadapt server for --baseline")
    m.add_argument("--baseline-model", default=None,
                   help="MGG_MODEL of the spawned baseline server (default: the model --url reports)")
    m.add_argument("--compare", default=None, metavar="BASELINE.json",
                   help="print (and record in the report) the side-by-side table of this run against a baseline "
                        "report (with --baseline: against an adapted report)")
    m.add_argument("--report", default=None, metavar="REPORT.json",
                   help="with --compare: compare this existing report instead of replaying")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help="output folder for replay.json, replay.md and replay.png (default: runs/replay-<run id>)")
    o.add_argument("--name", default=None, help="file stem inside --out (default: replay or baseline)")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """The ``mgg replay`` subcommand, its flags in three groups (streams, transport, comparison and output)."""
    p = subparsers.add_parser(
        "replay", help="replay labelled test streams to a running service and report accuracy, latency, errors",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_stream_flags(p)
    _add_transport_flags(p)
    _add_comparison_flags(p)
    p.set_defaults(func=main)
    return p


def _spec_options(args: argparse.Namespace) -> SpecOptions:
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()] if args.corruptions else None
    return SpecOptions(data=args.data, spec_file=args.spec, corruptions=corruptions, severity=args.severity,
                       profile=args.profile, images_per_domain=args.images_per_domain or None,
                       batch_size=args.batch_size,
                       order=args.order, reset=args.reset, label_shift=args.label_shift,
                       domain_order=args.domain_order, seed=args.seed, streams=args.streams)


def replay(args: argparse.Namespace, url: str, mode: str, run_id: str,
           extra_protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one replay against ``url``; returns the report (not yet written)."""
    import httpx

    opts = _spec_options(args)
    prefix = args.stream_prefix or f"replay-{run_id}"
    v2 = getattr(args, "protocol", "predict") == "v2"
    plans, class_names, spec = build_plans(opts, prefix, "npy" if v2 else args.fmt)
    cfg = ReplayConfig(url=url.rstrip("/"), fmt="v2" if v2 else args.fmt, duration_s=args.duration,
                       images_per_stream=args.images_per_stream, timeout_s=args.timeout,
                       max_retries=args.max_retries, reset_at_start=not args.no_reset, token=args.token,
                       progress=not args.no_progress, protocol="v2" if v2 else "predict",
                       model_name=getattr(args, "model_name", None))
    with httpx.Client() as client:
        try:
            wait_ready(client, cfg.url, max(float(args.wait_ready), 0.5))
        except (TimeoutError, RuntimeError) as exc:
            detail = ""
            with contextlib.suppress(httpx.HTTPError):
                detail = client.get(cfg.url + "/readyz", timeout=5).text[:400]
            raise SystemExit(f"mgg replay: {exc} {detail}".rstrip()) from None
        info = server_info(client, cfg.url)
        if v2 and not cfg.model_name:
            cfg.model_name = served_model(client, cfg.url)
    replayer = Replayer(cfg, plans, class_names)
    try:
        wall = replayer.run()
    finally:
        replayer.close()
    planned = sum(p.total_images or 0 for p in plans)
    if cfg.images_per_stream is not None:
        planned = sum(min(p.total_images or cfg.images_per_stream, cfg.images_per_stream) for p in plans)
    batch_size = plans[0].describe["stream_spec"]["batch_size"]
    report = {
        "schema": REPORT_SCHEMA,
        "mode": mode,
        "run_id": run_id,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": ["mgg", "replay", *getattr(args, "argv", [])],
        "protocol": {
            "url": cfg.url, "data": opts.data, "format": cfg.fmt, "streams": opts.streams,
            "transport": ({"protocol": "v2", "model_name": cfg.model_name, "endpoint": infer_path(cfg.model_name or ""),
                           "stream": "parameters.sequence_id", "resets": "parameters.sequence_start"}
                          if v2 else {"protocol": "predict", "endpoint": "/predict", "stream": "X-Stream-Id",
                                      "resets": "POST /reset"}),
            "batch_size": batch_size, "images_per_stream": cfg.images_per_stream, "duration_s": cfg.duration_s,
            "reset_at_start": cfg.reset_at_start, "timeout_s": cfg.timeout_s, "max_retries": cfg.max_retries,
            "stream_spec": spec,
            "plans": [{"stream_id": p.stream_id, "seed": p.seed, "domains": p.domains,
                       "planned_images": p.total_images, **p.describe} for p in plans],
            "accuracy_definition": "top-1 of the predictions in each /predict response (made before that batch's "
                                   "update), counted over every answered image",
            "latency_definition": "client-side wall time of each successful POST /predict, retries excluded",
            "throughput_definition": "answered images / wall time from the first request to the last answer",
            **(extra_protocol or {}),
        },
        "server": info,
        "versions": versions(),
        "class_names": class_names,
        "resets": replayer.resets,
        "summary": summarize(replayer.records, wall, planned),
        "requests": [asdict(r) for r in sorted(replayer.records, key=lambda r: (r.t_s, r.stream_id))],
    }
    return report



def _baseline_report(args: argparse.Namespace, run_id: str, log_dir: Path) -> dict[str, Any]:
    import httpx

    if args.baseline_url:
        url, how = args.baseline_url.rstrip("/"), "given --baseline-url"
        server = None
    else:
        with httpx.Client() as client:
            target = server_info(client, args.url.rstrip("/"))
        method = server_method(target)
        if method == "noadapt":
            url, how, server = args.url.rstrip("/"), "--url already serves MGG_METHOD=noadapt", None
        else:
            served = server_model(target)
            model = args.baseline_model or served.get("checkpoint")
            if not model:
                raise SystemExit("mgg replay --baseline: cannot tell which checkpoint --url serves (no /info); "
                                 "pass --baseline-model or --baseline-url")
            if not args.baseline_model and not Path(str(model)).is_file():
                raise SystemExit(f"mgg replay --baseline: the checkpoint {model} that --url reports is not on this "
                                 "machine; pass --baseline-model (bundled name or path) or --baseline-url")
            log_dir.mkdir(parents=True, exist_ok=True)
            server = LocalServer({"MGG_METHOD": "noadapt", "MGG_MODEL": str(model),
                                  **({"MGG_DEVICE": str(served["device"])} if served.get("device") else {}),
                                  "MGG_SNAPSHOT_DIR": str(log_dir / "baseline-snapshots")},
                                 log_path=log_dir / "baseline-server.log")
            url, how = server.url, f"spawned local server with MGG_METHOD=noadapt MGG_MODEL={model}"
    if server is not None:
        print(f"mgg replay: starting the baseline server ({how}) ...", file=sys.stderr)
        with server:
            report = _checked_baseline(args, server.url, run_id, how)
    else:
        report = _checked_baseline(args, url, run_id, how)
    return report


def _checked_baseline(args: argparse.Namespace, url: str, run_id: str, how: str) -> dict[str, Any]:
    import httpx

    with httpx.Client() as client:
        method = server_method(server_info(client, url))
    if method is not None and method != "noadapt":
        raise SystemExit(f"mgg replay --baseline: {url} adapts (method {method!r}); "
                         "a baseline needs MGG_METHOD=noadapt")
    return replay(args, url, "baseline", run_id, {"baseline": {"how": how, "url": url, "server_method": method}})


USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError)


def main(args: argparse.Namespace) -> int:
    """``mgg replay``; the user's errors (a bad --data, domain, spec) are one line on stderr, no traceback."""
    try:
        return _main(args)
    except USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise SystemExit(f"mgg replay: error: {' '.join(str(msg).split())}") from None


def _main(args: argparse.Namespace) -> int:
    if not hasattr(args, "argv"):
        args.argv = sys.argv[2:] if len(sys.argv) > 2 and sys.argv[1] == "replay" else []
    if args.report:
        if not args.compare:
            raise SystemExit("mgg replay --report needs --compare BASELINE.json")
        print(compare_table(load_report(args.compare), load_report(args.report)))
        return 0
    run_id = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    out_dir = Path(args.out) if args.out else Path("runs") / f"replay-{run_id}"
    if args.baseline:
        report = _baseline_report(args, run_id, out_dir)
    else:
        report = replay(args, args.url, "adapt", run_id)
    if args.compare:
        other = load_report(args.compare)
        # columns: the no-adaptation run first, whichever of the two this run is
        table = compare_table(report, other) if args.baseline else compare_table(other, report)
        report["comparison"] = {"other_report": str(args.compare), "table": table}
    stem = args.name or ("baseline" if args.baseline else "replay")
    files = write_report(report, out_dir, stem)
    s = report["summary"]
    lat = s["latency"]
    print(f"mgg replay ({report['mode']}): accuracy {fmt_pct(s['accuracy'])} on {s['images_answered']} images, "
          f"{fmt_num(s['throughput_img_s'])} img/s, latency p50/p95/p99 {fmt_num(lat['p50_ms'])}/"
          f"{fmt_num(lat['p95_ms'])}/{fmt_num(lat['p99_ms'])} ms, errors {s['errors']['total']}"
          f"{' ' + json.dumps(s['errors']['by_status']) if s['errors']['by_status'] else ''}")
    print(f"  report: {files['json']}\n  summary: {files['md']}\n  plot: {files['png']}")
    if args.compare:
        print(report["comparison"]["table"])
    return 0 if s["requests_failed"] == 0 else 1
