"""Prometheus metrics of one app instance (own CollectorRegistry; no global state, no stream-id labels)."""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PHASE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATIO_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 0.05 .. 1.0
FUSED_STREAM_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
FUSED_IMAGE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PHASES = ("decode", "preprocess", "forward", "backward", "optimizer", "snapshot", "restore")


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.http_duration = Histogram(
            "tta_http_request_duration_seconds", "HTTP request latency.", ["method", "route", "status"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "tta_http_requests_total", "HTTP requests by route and status.", ["method", "route", "status"], registry=r
        )
        self.phase_duration = Histogram(
            "tta_phase_duration_seconds", "Time spent per processing phase.", ["phase"], buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.images = Counter("tta_images_total", "Images classified.", registry=r)
        self.steps = Counter("tta_adaptation_steps_total", "Adaptation updates applied.", registry=r)
        self.skipped = Counter(
            "tta_adaptation_skipped_total", "Batches for which no update was applied.", ["reason"], registry=r
        )
        self.batch_entropy = Histogram(
            "tta_batch_entropy_ratio", "Per-batch mean prediction entropy divided by ln(num_classes).",
            buckets=RATIO_BUCKETS, registry=r,
        )
        self.resets = Counter("tta_resets_total", "Streams reset to the source state.", ["reason"], registry=r)
        self.rollbacks = Counter(
            "tta_rollbacks_total", "Collapse-guard rollbacks of a stream's state.", ["reason"], registry=r
        )
        self.holds = Counter(
            "tta_guard_holds_total", "Guard fallbacks that hold a stream at source (no adaptation) for a while, by "
            "the fallback's reason.", ["reason"], registry=r
        )
        self.hold_releases = Counter(
            "tta_guard_hold_releases_total", "Guard holds at source ended early (the domain changed, the source "
            "failed).", ["reason"], registry=r
        )
        self.streams_active = Gauge("tta_streams_active", "Streams whose state is in memory.", registry=r)
        self.streams_known = Gauge("tta_streams_known", "Streams in memory or snapshotted on disk.", registry=r)
        self.state_bytes = Gauge("tta_state_bytes", "Bytes of stream state held in memory.", registry=r)
        self.state_budget_bytes = Gauge("tta_state_budget_bytes", "Configured in-memory state budget.", registry=r)
        self.queue_depth = Gauge("tta_queue_depth", "Predict requests waiting or running.", registry=r)
        self.rejected = Counter(
            "tta_requests_rejected_total", "Requests refused with 429 because a queue was full.", ["queue"], registry=r
        )
        self.snapshots = Counter("tta_snapshots_total", "Stream snapshots written.", ["reason"], registry=r)
        self.snapshot_duration = Histogram(
            "tta_snapshot_duration_seconds", "Time to write one stream snapshot.", buckets=PHASE_BUCKETS, registry=r
        )
        self.snapshot_restores = Counter(
            "tta_snapshot_restores_total", "Stream states restored from disk.", registry=r
        )
        self.snapshot_errors = Counter(
            "tta_snapshot_errors_total", "Snapshot writes or restores that failed.", ["op"], registry=r
        )
        self.evictions = Counter(
            "tta_stream_evictions_total", "Streams unloaded from memory.", ["reason"], registry=r
        )
        self.replays = Counter(
            "tta_idempotent_replays_total", "Requests answered from an Idempotency-Key's stored answer (no step).",
            registry=r,
        )
        self.build_info = Gauge(
            "tta_build_info", "Build and model information (value 1).",
            ["version", "model", "method", "optimizer", "device", "torch"], registry=r,
        )
        self.pixels_in_flight = Gauge(
            "tta_pixels_in_flight", "Decoded image pixels held by requests now (bounded by max_pixels_in_flight).",
            registry=r,
        )
        self.ready = Gauge("tta_ready", "1 when the model is loaded and warmed up.", registry=r)
        self.fused_streams = Histogram(
            "tta_fused_step_streams", "Streams per fused adaptation step (service.scheduler; 1 = a lone step).",
            buckets=FUSED_STREAM_BUCKETS, registry=r,
        )
        self.fused_images = Histogram(
            "tta_fused_step_images", "Images per fused adaptation step, all its streams together.",
            buckets=FUSED_IMAGE_BUCKETS, registry=r,
        )
        self.fused_queue_wait = Histogram(
            "tta_fused_queue_wait_seconds", "Time a request's step waited in the scheduler for its fused call.",
            buckets=PHASE_BUCKETS, registry=r,
        )
        self.started = Gauge("tta_start_time_seconds", "Unix time the app was created.", registry=r)
        self.started.set(time.time())
        # labelled children of the per-request metrics, looked up once: prometheus_client's labels() validates
        # and locks on every call, about 5 us, and a /predict observes about a dozen of them
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        for phase in PHASES:  # expose every phase from the start (zero counts)
            self.child(self.phase_duration, phase)

    def child(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, cached for the process's life: only for label values from bounded sets
        (phases, route templates, status codes, skip reasons, the methods of
        :data:`service.middleware.METRIC_METHODS` or ``other``), never a value a client chooses."""
        key = (id(metric), values)
        got = self._children.get(key)
        if got is None:
            got = self._children[key] = metric.labels(*values)
        return got

    def observe_phase(self, phase: str, seconds: float) -> None:
        self.child(self.phase_duration, phase).observe(max(0.0, float(seconds)))

    def set_build_info(self, **labels: Any) -> None:
        self.build_info.labels(**{k: str(v) for k, v in labels.items()}).set(1)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
