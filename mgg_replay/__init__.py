"""`mgg replay`: a load client that replays labelled test streams to the adaptation service and reports online
accuracy, throughput, latency and errors (see :mod:`mgg_replay.cli` for the whole story).

Modules:

- :mod:`.plans`: one ``StreamSpec`` per replayed stream, and its batches (images, labels, domains);
- :mod:`.client`: encoding, the concurrent :class:`Replayer`, what the server says about itself;
- :mod:`.report`: summary statistics, the JSON/markdown/PNG report files, the baseline comparison table;
- :mod:`.server`: start a server subprocess and wait until it is ready (shared with the tests and
  ``scripts/bench_service.py``);
- :mod:`.cli`: the ``mgg replay`` sub-command (``add_parser``/``main``, dispatched by ``mgg_core.cli``).

It talks to the service over HTTP only and imports nothing from ``service``.
"""
from __future__ import annotations

from .cli import add_parser, main, replay
from .client import (
    DEFAULT_URL,
    STREAM_HEADER,
    Encoded,
    ReplayConfig,
    Replayer,
    RequestRecord,
    correct_mask,
    count_correct,
    encode_batch,
    encode_npy,
    encode_png_files,
    parse_build_info,
    server_info,
    server_method,
    server_model,
    versions,
)
from .plans import (
    DEFAULT_MNIST_C_CORRUPTIONS,
    MNIST_C,
    Batch,
    SpecOptions,
    StreamPlan,
    base_spec,
    build_plans,
    stream_specs,
)
from .report import (
    REPORT_SCHEMA,
    compare_table,
    latency_summary,
    load_report,
    markdown_summary,
    percentile,
    plot_report,
    summarize,
    write_report,
)
from .server import SERVER_COMMAND, LocalServer, ServerProcess, free_port, serve_command, wait_ready

__all__ = [
    "DEFAULT_MNIST_C_CORRUPTIONS", "DEFAULT_URL", "MNIST_C", "REPORT_SCHEMA", "SERVER_COMMAND", "STREAM_HEADER",
    "Batch", "Encoded", "LocalServer", "ReplayConfig", "Replayer", "RequestRecord", "ServerProcess", "SpecOptions",
    "StreamPlan", "add_parser", "base_spec", "build_plans", "compare_table", "correct_mask", "count_correct",
    "encode_batch", "encode_npy", "encode_png_files", "free_port", "latency_summary", "load_report", "main",
    "markdown_summary", "parse_build_info", "percentile", "plot_report", "replay", "serve_command", "server_info",
    "server_method", "server_model", "stream_specs", "summarize", "versions", "wait_ready", "write_report",
]
