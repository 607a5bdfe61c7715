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
import concurrent.futures as cf
import dataclasses
import datetime as _dt
import io
import json
import math
import os
import platform
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPORT_SCHEMA = "mgg-replay/1"
DEFAULT_URL = "http://127.0.0.1:8000"
MNIST_C = "mnist5k-c"
STREAM_HEADER = "X-Stream-Id"


# ------------------------------------------------------------------------------------------------ data plans


@dataclass
class Batch:
    """One request's worth of a stream: uint8 images (N,H,W[,C]), their labels and the domain they come from."""

    images: np.ndarray
    labels: np.ndarray
    domain: str  # the batch's domain, or "mixed" when its samples come from several
    reset_before: bool = False  # reset the stream before sending this batch (StreamSpec reset policy)
    sample_domains: list[str] | None = None  # domain of each image (None = all ``domain``)


@dataclass
class StreamPlan:
    """What one replayed stream will send: an id, a seed, a domain order and a batch iterator factory."""

    stream_id: str
    seed: int
    domains: list[str]
    total_images: int | None
    make_batches: Callable[[], Iterator[Batch]]
    describe: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ encoding


def encode_npy(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue(), {"Content-Type": "application/x-npy"}


def encode_png_files(images: np.ndarray) -> list[tuple[str, tuple[str, bytes, str]]]:
    from PIL import Image

    files = []
    for i, img in enumerate(images):
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        files.append(("images", (f"{i:04d}.png", buf.getvalue(), "image/png")))
    return files


@dataclass
class Encoded:
    kind: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: list | None = None

    @property
    def nbytes(self) -> int:
        if self.content is not None:
            return len(self.content)
        return sum(len(f[1][1]) for f in self.files or [])


def encode_batch(images: np.ndarray, fmt: str) -> Encoded:
    if fmt == "npy":
        body, headers = encode_npy(images)
        return Encoded("npy", content=body, headers=headers)
    if fmt == "png":
        return Encoded("png", files=encode_png_files(images))
    raise ValueError(f"unknown body format {fmt!r}; choose npy or png")


# ------------------------------------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def latency_summary(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [1000.0 * s for s in seconds]
    return {
        "count": len(ms),
        "mean_ms": float(np.mean(ms)) if ms else None,
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": float(np.max(ms)) if ms else None,
    }


# ------------------------------------------------------------------------------------------------ server info


def parse_build_info(metrics_text: str) -> dict[str, str] | None:
    """Labels of the ``tta_build_info`` gauge from a Prometheus text exposition, or None."""
    for line in metrics_text.splitlines():
        if line.startswith("tta_build_info{"):
            inside = line[len("tta_build_info{"): line.rindex("}")]
            return {k: bytes(v, "utf-8").decode("unicode_escape")
                    for k, v in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', inside)}
    return None


def server_info(client: Any, url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """Whatever the server says about itself: /healthz, /readyz bodies and the tta_build_info labels."""
    info: dict[str, Any] = {"url": url}
    for path in ("/healthz", "/readyz", "/info"):
        try:
            r = client.get(url + path, headers=headers, timeout=10)
            try:
                body: Any = r.json()
            except ValueError:
                body = r.text[:500]
            info[path.strip("/")] = {"status": r.status_code, "body": body}
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            info[path.strip("/")] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        r = client.get(url + "/metrics", timeout=10)
        if r.status_code == 200:
            info["build_info"] = parse_build_info(r.text)
    except Exception as exc:  # noqa: BLE001
        info["build_info_error"] = f"{type(exc).__name__}: {exc}"
    return info


def server_method(info: dict[str, Any]) -> str | None:
    """The adaptation method the server reports (/info, else tta_build_info), or None."""
    body = (info.get("info") or {}).get("body")
    if isinstance(body, dict) and isinstance(body.get("model"), dict) and body["model"].get("method"):
        return str(body["model"]["method"])
    bi = info.get("build_info") or {}
    return bi.get("method") or None


def server_model(info: dict[str, Any]) -> dict[str, Any]:
    """Model facts the server reports in /info (model name, checkpoint, classes, optimizer, device...)."""
    body = (info.get("info") or {}).get("body")
    if isinstance(body, dict) and isinstance(body.get("model"), dict):
        return dict(body["model"])
    return dict(info.get("build_info") or {})


def wait_ready(client: Any, url: str, timeout: float, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before it was ready")
        try:
            r = client.get(url + "/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = f"/readyz answered {r.status_code}"
            if "model_load_failed" in r.text:  # it will never become ready
                raise RuntimeError(f"{url} cannot load its model: {r.text[:400]}")
        except Exception as exc:  # noqa: BLE001 - still starting
            last = f"{type(exc).__name__}"
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s ({last})")


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("mgg-tta", "numpy", "httpx", "pillow", "matplotlib", "imagecorruptions-imaug"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


# ------------------------------------------------------------------------------------------------ the replay


@dataclass
class ReplayConfig:
    url: str = DEFAULT_URL
    fmt: str = "npy"
    duration_s: float | None = None
    images_per_stream: int | None = None
    timeout_s: float = 120.0
    max_retries: int = 20
    reset_at_start: bool = True
    token: str | None = None
    progress: bool = True
    prefetch: int = 4


@dataclass
class RequestRecord:
    stream_id: str
    seq: int
    domain: str
    n: int
    status: int | str
    latency_s: float | None
    t_s: float  # end of the request, seconds since the replay started
    attempts: int = 1
    step: int | None = None
    adapted: bool | None = None
    skipped_reason: str | None = None
    batch_entropy: float | None = None
    rolled_back: bool | None = None
    correct: int | None = None
    per_domain: dict[str, list[int]] | None = None  # domain -> [correct, images], for batches that mix domains
    error: str | None = None
    final: bool = True  # False for a 429/503/transport failure that was retried


def correct_mask(predictions: list[dict[str, Any]], labels: np.ndarray,
                 class_names: Sequence[str] | None) -> np.ndarray:
    """Per image: does the prediction match the label? Int labels are class indices, strings class names."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} images")
    out = np.zeros(len(labels), dtype=bool)
    for k, (pred, y) in enumerate(zip(predictions, labels)):
        lab = pred.get("label")
        if isinstance(lab, (int, np.integer)) and not isinstance(lab, bool):
            out[k] = int(lab) == int(y)
        else:
            name = pred.get("class_name", lab)
            truth = class_names[int(y)] if class_names else str(int(y))
            out[k] = str(name) == str(truth)
    return out


def count_correct(predictions: list[dict[str, Any]], labels: np.ndarray, class_names: Sequence[str] | None) -> int:
    return int(correct_mask(predictions, labels, class_names).sum())


class _Prefetcher:
    """Generates (and encodes) a stream's batches in a background thread, a few ahead of the sender."""

    _END = object()

    def __init__(self, batches: Iterator[Batch], fmt: str, depth: int, stop: threading.Event) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = stop
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(batches, fmt), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, batches: Iterator[Batch], fmt: str) -> None:
        try:
            for batch in batches:
                if not self._put((batch, encode_batch(batch.images, fmt))):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._error = exc
        self._put(self._END)

    def __iter__(self) -> Iterator[tuple[Batch, Encoded]]:
        while True:
            try:
                item = self._q.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if item is self._END:
                if self._error is not None:
                    raise self._error
                return
            yield item


class Replayer:
    def __init__(self, config: ReplayConfig, plans: list[StreamPlan], class_names: Sequence[str] | None) -> None:
        import httpx

        self.cfg = config
        self.plans = plans
        self.class_names = list(class_names) if class_names is not None else None
        self.records: list[RequestRecord] = []
        self.resets: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        n = max(1, len(plans))
        self.client = httpx.Client(
            timeout=httpx.Timeout(config.timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=2 * n + 2, max_keepalive_connections=2 * n + 2),
        )
        self._pbar: Any = None
        self._t0 = 0.0

    # -- HTTP helpers
    def _admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.token}"} if self.cfg.token else {}

    def reset(self, stream_id: str, reason: str) -> None:
        r = self.client.post(self.cfg.url + "/reset", json={"stream_id": stream_id}, headers=self._admin_headers())
        entry = {"stream_id": stream_id, "reason": reason, "status": r.status_code, "t_s": time.perf_counter() - self._t0}
        with self._lock:
            self.resets.append(entry)
        # 404: the server has never seen the stream (nothing to reset) - that is a clean start too.
        if r.status_code not in (200, 204, 404):
            raise RuntimeError(f"POST /reset for {stream_id!r} answered {r.status_code}: {r.text[:300]}")

    def _send(self, stream_id: str, enc: Encoded) -> tuple[Any, float, int, list[int | str]]:
        """POST one batch; retries 429/503 after Retry-After. Returns (response|None, latency, attempts, failures)."""
        import httpx

        headers = {STREAM_HEADER: stream_id, **enc.headers}
        failures: list[int | str] = []
        attempt = 0
        while True:
            attempt += 1
            t = time.perf_counter()
            try:
                if enc.content is not None:
                    r = self.client.post(self.cfg.url + "/predict", content=enc.content, headers=headers)
                else:
                    r = self.client.post(self.cfg.url + "/predict", files=enc.files, headers=headers)
            except httpx.HTTPError as exc:
                latency = time.perf_counter() - t
                failures.append(f"exception:{type(exc).__name__}")
                if attempt > self.cfg.max_retries or self._stop.is_set():
                    return None, latency, attempt, failures
                time.sleep(min(2.0, 0.1 * attempt))
                continue
            latency = time.perf_counter() - t
            if r.status_code in (429, 503) and attempt <= self.cfg.max_retries and not self._stop.is_set():
                failures.append(r.status_code)
                try:
                    wait = float(r.headers.get("Retry-After", "0.5"))
                except ValueError:
                    wait = 0.5
                time.sleep(min(max(wait, 0.05), 5.0))
                continue
            return r, latency, attempt, failures

    # -- one stream
    def _run_stream(self, plan: StreamPlan, deadline: float | None) -> None:
        if self.cfg.reset_at_start:
            self.reset(plan.stream_id, "start")
        sent = 0
        cap = self.cfg.images_per_stream
        for seq, (batch, enc) in enumerate(_Prefetcher(plan.make_batches(), self.cfg.fmt, self.cfg.prefetch, self._stop)):
            if self._stop.is_set() or (deadline is not None and time.perf_counter() >= deadline):
                break
            if cap is not None and sent >= cap:
                break
            if cap is not None and sent + len(batch.labels) > cap:  # trim the last batch to the cap
                keep = cap - sent
                batch = Batch(batch.images[:keep], batch.labels[:keep], batch.domain, batch.reset_before,
                              batch.sample_domains[:keep] if batch.sample_domains else None)
                enc = encode_batch(batch.images, self.cfg.fmt)
            if batch.reset_before and seq > 0:
                self.reset(plan.stream_id, f"domain:{batch.domain}")
            r, latency, attempts, failures = self._send(plan.stream_id, enc)
            rec = RequestRecord(plan.stream_id, seq, batch.domain, len(batch.labels), "exception", latency,
                                time.perf_counter() - self._t0, attempts)
            if r is None:
                rec.error = str(failures[-1]) if failures else "no response"
            else:
                rec.status = r.status_code
                if r.status_code == 200:
                    body = r.json()
                    rec.step = body.get("step")
                    rec.adapted = body.get("adapted")
                    rec.skipped_reason = body.get("skipped_reason")
                    be = body.get("batch_entropy")
                    rec.batch_entropy = float(be) if be is not None else None
                    rec.rolled_back = body.get("rolled_back")
                    mask = correct_mask(body.get("predictions") or [], batch.labels, self.class_names)
                    rec.correct = int(mask.sum())
                    if batch.domain == "mixed" and batch.sample_domains:
                        per: dict[str, list[int]] = {}
                        for ok_, d in zip(mask, batch.sample_domains):
                            e = per.setdefault(d, [0, 0])
                            e[0] += int(ok_)
                            e[1] += 1
                        rec.per_domain = per
                else:
                    rec.error = r.text[:300]
            with self._lock:
                self.records.append(rec)
                for f in failures:
                    self.records.append(RequestRecord(plan.stream_id, seq, batch.domain, len(batch.labels), f,
                                                      None, rec.t_s, 0, error="retried", final=False))
            sent += len(batch.labels)
            if self._pbar is not None:
                self._pbar.update(len(batch.labels))
                if rec.correct is not None:
                    self._update_postfix()

    def _update_postfix(self) -> None:
        with self._lock:
            ok = [r for r in self.records if r.correct is not None]
            n = sum(r.n for r in ok)
            c = sum(r.correct for r in ok)
        if n:
            self._pbar.set_postfix(acc=f"{100.0 * c / n:.1f}%", refresh=False)

    def run(self) -> float:
        total = None
        if all(p.total_images is not None for p in self.plans):
            total = sum(p.total_images for p in self.plans)
            if self.cfg.images_per_stream is not None:
                total = sum(min(p.total_images, self.cfg.images_per_stream) for p in self.plans)
        elif self.cfg.images_per_stream is not None:
            total = self.cfg.images_per_stream * len(self.plans)
        if self.cfg.progress:
            from tqdm import tqdm

            self._pbar = tqdm(total=total, unit="img", desc="replay", dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.perf_counter()
        deadline = self._t0 + self.cfg.duration_s if self.cfg.duration_s else None
        try:
            with cf.ThreadPoolExecutor(max_workers=max(1, len(self.plans)), thread_name_prefix="replay") as pool:
                futures = [pool.submit(self._run_stream, p, deadline) for p in self.plans]
                try:
                    for fut in cf.as_completed(futures):
                        fut.result()
                except BaseException:
                    self._stop.set()
                    raise
        finally:
            wall = time.perf_counter() - self._t0
            if self._pbar is not None:
                self._pbar.close()
        return wall

    def close(self) -> None:
        self._stop.set()
        self.client.close()


# ------------------------------------------------------------------------------------------------ summary


def _acc(correct: int, total: int) -> float | None:
    return correct / total if total else None


def summarize(records: Sequence[RequestRecord], wall_s: float, images_planned: int | None = None) -> dict[str, Any]:
    final = [r for r in records if r.final]
    ok = [r for r in final if r.status == 200 and r.correct is not None]
    by_status: dict[str, int] = {}
    for r in records:
        if r.status != 200:
            by_status[str(r.status)] = by_status.get(str(r.status), 0) + 1
    failed_final = [r for r in final if r.status != 200]

    def acc_table(key: Callable[[RequestRecord], str], split_mixed: bool = False) -> dict[str, dict[str, Any]]:
        table: dict[str, dict[str, Any]] = {}
        for r in ok:
            mixed = bool(split_mixed and r.per_domain)
            parts = r.per_domain.items() if mixed else [(key(r), (r.correct, r.n))]
            for k, (c, n) in parts:
                e = table.setdefault(k, {"correct": 0, "total": 0, "batches": 0, "entropy_sum": 0.0, "entropy_n": 0})
                e["correct"] += c
                e["total"] += n
                e["batches"] += 1
                # a batch's entropy belongs to one domain only when the batch does not mix domains
                if not mixed and r.batch_entropy is not None and math.isfinite(r.batch_entropy):
                    e["entropy_sum"] += r.batch_entropy
                    e["entropy_n"] += 1
        for e in table.values():
            e["accuracy"] = _acc(e["correct"], e["total"])
            e["mean_batch_entropy"] = e["entropy_sum"] / e["entropy_n"] if e["entropy_n"] else None
            del e["entropy_sum"], e["entropy_n"]
        return table

    images_answered = sum(r.n for r in ok)
    correct = sum(r.correct for r in ok)
    entropies = [r.batch_entropy for r in ok if r.batch_entropy is not None and math.isfinite(r.batch_entropy)]
    skipped: dict[str, int] = {}
    for r in ok:
        if r.adapted is False:
            reason = r.skipped_reason or "unspecified"
            skipped[reason] = skipped.get(reason, 0) + 1
    return {
        "requests": len(final),
        "requests_ok": len(ok),
        "requests_failed": len(failed_final),
        "images_planned": images_planned,
        "images_sent": sum(r.n for r in final),
        "images_answered": images_answered,
        "correct": correct,
        "accuracy": _acc(correct, images_answered),
        "accuracy_by_domain": acc_table(lambda r: r.domain, split_mixed=True),
        "accuracy_by_stream": acc_table(lambda r: r.stream_id),
        "wall_s": wall_s,
        "throughput_img_s": images_answered / wall_s if wall_s > 0 else None,
        "throughput_req_s": len(ok) / wall_s if wall_s > 0 else None,
        "latency": latency_summary([r.latency_s for r in ok if r.latency_s is not None]),
        "errors": {"total": sum(by_status.values()), "by_status": dict(sorted(by_status.items())),
                   "retried": sum(1 for r in records if not r.final), "failed_requests": len(failed_final)},
        "adapted_batches": sum(1 for r in ok if r.adapted),
        "skipped_batches": dict(sorted(skipped.items())),
        "rollbacks": sum(1 for r in ok if r.rolled_back),
        "mean_batch_entropy": float(np.mean(entropies)) if entropies else None,
    }


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}%"


def _fmt_num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    p = report["protocol"]
    bi = (report.get("server") or {}).get("build_info") or {}
    lines = [
        f"# Replay report ({report['mode']})",
        "",
        f"- created: {report['created']}",
        f"- command: `{' '.join(report['command'])}`",
        f"- url: {p['url']}  (server method: {bi.get('method', 'n/a')}, model: {bi.get('model', 'n/a')}, "
        f"optimizer: {bi.get('optimizer', 'n/a')}, device: {bi.get('device', 'n/a')})",
        f"- data: {p['data']}; streams: {p['streams']}; batch size: {p['batch_size']}; body: {p['format']}; "
        f"reset at start: {p['reset_at_start']}; reset policy: {p['stream_spec']['base_spec']['reset']}; "
        f"order: {p['stream_spec']['base_spec']['order']}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| online accuracy | {_fmt_pct(s['accuracy'])} ({s['correct']}/{s['images_answered']}) |",
        f"| throughput | {_fmt_num(s['throughput_img_s'])} img/s, {_fmt_num(s['throughput_req_s'], 2)} req/s |",
        f"| latency p50 / p95 / p99 | {_fmt_num(s['latency']['p50_ms'])} / {_fmt_num(s['latency']['p95_ms'])} / "
        f"{_fmt_num(s['latency']['p99_ms'])} ms |",
        f"| requests ok / failed | {s['requests_ok']} / {s['requests_failed']} |",
        f"| errors by status | {json.dumps(s['errors']['by_status']) if s['errors']['by_status'] else 'none'} |",
        f"| adapted batches | {s['adapted_batches']} (skipped: {json.dumps(s['skipped_batches']) or 'none'}) |",
        f"| rollbacks | {s['rollbacks']} |",
        f"| mean batch entropy / ln C | {_fmt_num(s['mean_batch_entropy'], 3)} |",
        f"| wall time | {_fmt_num(s['wall_s'], 1)} s |",
        "",
        "## Accuracy by domain",
        "",
        "| domain | accuracy | images | mean entropy |",
        "| --- | --- | --- | --- |",
    ]
    for dom, e in s["accuracy_by_domain"].items():
        lines.append(f"| {dom} | {_fmt_pct(e['accuracy'])} | {e['total']} | {_fmt_num(e['mean_batch_entropy'], 3)} |")
    lines += ["", "## Accuracy by stream", "", "| stream | accuracy | images |", "| --- | --- | --- |"]
    for sid, e in s["accuracy_by_stream"].items():
        lines.append(f"| {sid} | {_fmt_pct(e['accuracy'])} | {e['total']} |")
    if report.get("comparison"):
        lines += ["", "## Comparison with the baseline", "", "```", report["comparison"]["table"], "```"]
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in report["requests"] if r["final"] and r["status"] == 200 and r["correct"] is not None]
    streams: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(recs, key=lambda r: (r["stream_id"], r["seq"])):
        streams.setdefault(r["stream_id"], []).append(r)
    fig, (ax_acc, ax_ent) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (sid, rs) in enumerate(streams.items()):
        color = colors[i % len(colors)]
        x = np.cumsum([r["n"] for r in rs])
        acc = np.array([100.0 * r["correct"] / r["n"] for r in rs])
        ax_acc.plot(x, acc, color=color, marker="o", ms=2.5, lw=1.0, label=sid)
        ent = [r["batch_entropy"] if r["batch_entropy"] is not None else np.nan for r in rs]
        ax_ent.plot(x, ent, color=color, marker="o", ms=2.5, lw=1.0, label=sid)
        prev = None
        for xi, r in zip(np.concatenate([[0], x[:-1]]), rs):
            if r["domain"] != prev and r["domain"] != "mixed":
                for ax in (ax_acc, ax_ent):
                    ax.axvline(xi, color=color, alpha=0.35, lw=0.8, ls=":")
                ax_acc.annotate(r["domain"], (xi, 2 + 7 * (i % 4)), color=color, fontsize=6, ha="left", va="bottom")
            prev = r["domain"]
    ax_acc.set_ylabel("online accuracy per batch (%)")
    ax_acc.set_ylim(0, 100)
    ax_ent.set_ylabel("batch entropy / ln C")
    ax_ent.set_ylim(0, 1)
    ax_ent.set_xlabel("images seen by the stream")
    ax_ent.legend(loc="upper right", fontsize=7)
    s = report["summary"]
    fig.suptitle(f"mgg replay ({report['mode']}): accuracy {_fmt_pct(s['accuracy'])}, "
                 f"{_fmt_num(s['throughput_img_s'])} img/s, p99 {_fmt_num(s['latency']['p99_ms'])} ms", y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_table(baseline: dict[str, Any], adapted: dict[str, Any]) -> str:
    """Side-by-side table of two reports: per-domain accuracy, overall accuracy, latency and throughput."""
    b, a = baseline["summary"], adapted["summary"]
    doms = list(b["accuracy_by_domain"])
    doms += [d for d in a["accuracy_by_domain"] if d not in doms]
    def name(r: dict[str, Any]) -> str:
        return f"{r['mode']} ({server_method(r.get('server') or {}) or 'n/a'})"

    name_b, name_a = name(baseline), name(adapted)
    rows: list[tuple[str, str, str, str]] = []

    def pct(e: dict | None) -> str:
        return _fmt_pct(e.get("accuracy")) if e else "-"

    def delta(x: float | None, y: float | None, scale: float = 100.0, unit: str = " pp") -> str:
        if x is None or y is None:
            return "-"
        return f"{scale * (y - x):+.2f}{unit}"

    for d in doms:
        eb, ea = b["accuracy_by_domain"].get(d), a["accuracy_by_domain"].get(d)
        rows.append((d, pct(eb), pct(ea), delta(eb and eb.get("accuracy"), ea and ea.get("accuracy"))))
    rows.append(("ALL (online accuracy)", _fmt_pct(b["accuracy"]), _fmt_pct(a["accuracy"]),
                 delta(b["accuracy"], a["accuracy"])))
    for q in ("p50", "p95", "p99"):
        kb, ka = b["latency"][f"{q}_ms"], a["latency"][f"{q}_ms"]
        rows.append((f"latency {q} (ms)", _fmt_num(kb), _fmt_num(ka), delta(kb, ka, 1.0, " ms")))
    rows.append(("throughput (img/s)", _fmt_num(b["throughput_img_s"]), _fmt_num(a["throughput_img_s"]),
                 delta(b["throughput_img_s"], a["throughput_img_s"], 1.0, "")))
    rows.append(("errors", str(b["errors"]["total"]), str(a["errors"]["total"]), ""))
    header = ("", name_b, name_a, "delta")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    out = [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------ stream plans


DEFAULT_MNIST_C_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast", "pixelate", "jpeg_compression")


@dataclass
class SpecOptions:
    """How the CLI derives one :class:`mgg_core.data.streams.StreamSpec` per replayed stream."""

    data: str = MNIST_C
    spec_file: str | None = None  # a StreamSpec JSON: the base spec (CLI stream options are then ignored)
    corruptions: list[str] | None = None  # None = DEFAULT_MNIST_C_CORRUPTIONS / every domain of the tree
    severity: int = 5
    profile: str = "imagenet-c"  # StreamSpec.profile: corruption constants, imagenet-c | cifar-c
    images_per_domain: int | None = 256  # StreamSpec.limit
    batch_size: int = 64
    order: str = "sequential"  # StreamSpec.order
    reset: str = "never"  # StreamSpec.reset: never | per_domain | every:N
    label_shift: float | None = None
    domain_order: str = "shuffled"  # "fixed" (same for every stream) or "shuffled" (per-stream, from its seed)
    seed: int = 0
    streams: int = 2


def _parse_reset(text: Any) -> Any:
    if isinstance(text, str) and text.startswith("every:"):
        return ("every", int(text.split(":", 1)[1]))
    return text


def _tree_domains(root: str, severity: int) -> list[tuple[str, int]]:
    from mgg_core.data.imagenet_c import is_imagenet_c_tree

    if not is_imagenet_c_tree(root):
        return [(c, severity) for c in DEFAULT_MNIST_C_CORRUPTIONS]
    base = Path(root)
    doms = sorted((c.name, int(sv.name)) for c in base.iterdir() if c.is_dir() and not c.name.startswith(".")
                  for sv in c.iterdir() if sv.is_dir() and sv.name.isdigit())
    return [d for d in doms if d[1] == severity] or doms


def base_spec(opts: SpecOptions) -> Any:
    """The stream spec every replayed stream starts from."""
    from mgg_core.data.streams import StreamSpec

    if opts.spec_file:
        return StreamSpec.from_json(Path(opts.spec_file).read_text(encoding="utf-8"))
    data = "mnist5k" if opts.data == MNIST_C else str(opts.data)
    if data != "mnist5k" and not Path(data).is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder (and not {MNIST_C!r})")
    if opts.corruptions:
        domains = [(c, opts.severity) if "-" not in c else c for c in opts.corruptions]
    elif data == "mnist5k":
        domains = [(c, opts.severity) for c in DEFAULT_MNIST_C_CORRUPTIONS]
    else:
        domains = _tree_domains(data, opts.severity)
    return StreamSpec(domains=domains, order=opts.order, batch_size=opts.batch_size, reset=_parse_reset(opts.reset),
                      label_shift=opts.label_shift, seed=opts.seed, limit=opts.images_per_domain, data=data,
                      profile=opts.profile)


def stream_specs(opts: SpecOptions) -> list[Any]:
    """One spec per stream: seed ``base.seed + i`` (its own subset, order within domains, corruption noise) and,
    with ``domain_order="shuffled"``, its own domain order drawn from that seed."""
    base = base_spec(opts)
    specs = []
    for i in range(opts.streams):
        domains = list(base.domains)
        if opts.domain_order == "shuffled" and len(domains) > 1:
            rng = np.random.default_rng([int(base.seed) & 0xFFFFFFFF, i, 0x5EED])
            domains = [domains[k] for k in rng.permutation(len(domains))]
        elif opts.domain_order not in ("fixed", "shuffled"):
            raise ValueError(f"unknown domain order {opts.domain_order!r}; choose fixed or shuffled")
        specs.append(dataclasses.replace(base, domains=domains, seed=base.seed + i))
    return specs


def _spec_batches(spec: Any, source: Any) -> Iterator[Batch]:
    from mgg_core.data.streams import iter_batches

    for b in iter_batches(spec, source):
        doms = list(b.domains)
        domain = doms[0] if all(d == doms[0] for d in doms) else "mixed"
        images = b.images
        if not isinstance(images, np.ndarray):  # differently sized images: multipart only
            arr = np.empty(len(images), dtype=object)
            arr[:] = list(images)
            images = arr
        yield Batch(images, np.asarray(b.labels), domain, bool(b.reset_before), doms)


def build_plans(opts: SpecOptions, stream_prefix: str, fmt: str = "npy"
                ) -> tuple[list[StreamPlan], list[str], dict[str, Any]]:
    from mgg_core.data.streams import open_stream_source, stream_plan

    if opts.streams < 1:
        raise ValueError("--streams must be at least 1")
    specs = stream_specs(opts)
    source = open_stream_source(specs[0])  # shared (read-only) by every stream
    class_names = list(getattr(source, "class_names", None) or [])
    plans = []
    for i, spec in enumerate(specs):
        _, batches = stream_plan(spec, source)
        total = int(sum(len(idx) for _, idx in batches))
        plans.append(StreamPlan(
            stream_id=f"{stream_prefix}-{i}", seed=spec.seed, domains=list(spec.domain_names), total_images=total,
            make_batches=lambda spec=spec: _spec_batches(spec, source),
            describe={"stream_spec": spec.to_dict(), "num_batches": len(batches)},
        ))
    if fmt == "npy":  # fail early rather than on the first mixed-size batch
        first = next(iter(plans[0].make_batches()), None)
        if first is not None and first.images.dtype == object:
            raise ValueError("the images of this data differ in size and cannot form one .npy batch; use --format png")
    description = {"base_spec": base_spec(opts).to_dict(), "per_stream": "seed = base seed + stream index"
                   + ("; domain order shuffled per stream from its seed" if opts.domain_order == "shuffled" else ""),
                   "source": source.describe() if hasattr(source, "describe") else str(opts.data)}
    return plans, class_names, description


# ------------------------------------------------------------------------------------------------ baseline server


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


SERVER_COMMAND = ("-m", "uvicorn", "--factory", "service.app:create_app")


class LocalServer:
    """The service (``uvicorn --factory service.app:create_app``, settings from MGG_* environment variables) in a
    subprocess on a free local port; a context manager that waits for /readyz and stops the process on exit."""

    def __init__(self, env: dict[str, str], host: str = "127.0.0.1", port: int | None = None,
                 ready_timeout: float = 180.0, log_path: str | os.PathLike | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.env = {**os.environ, **env, "MGG_HOST": host, "MGG_PORT": str(self.port)}
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._log: Any = None

    def __enter__(self) -> LocalServer:
        import httpx

        self._log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        cmd = [sys.executable, *SERVER_COMMAND, "--host", self.host, "--port", str(self.port),
               "--log-level", "warning", "--no-access-log"]
        self.process = subprocess.Popen(cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            with httpx.Client() as client:
                wait_ready(client, self.url, self.ready_timeout, self.process)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()


# ------------------------------------------------------------------------------------------------ CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "replay", help="replay labelled test streams to a running service and report accuracy, latency, errors",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("MGG_REPLAY_URL", DEFAULT_URL), help="service base URL")
    p.add_argument("--data", default=MNIST_C,
                   help=f"{MNIST_C!r} (embedded MNIST-5k test split, corrupted on the fly) or an ImageNet-C layout "
                        "folder DIR/<corruption>/<severity>/<class>/<image>")
    g = p.add_argument_group("stream spec (mgg_core.data.streams.StreamSpec, one per stream)")
    g.add_argument("--spec", default=None, metavar="SPEC.json",
                   help="a StreamSpec JSON as the base spec (then --corruptions/--severity/--images-per-domain/"
                        "--batch-size/--order/--reset/--label-shift are ignored)")
    g.add_argument("--streams", type=int, default=2, help="concurrent streams, each with its own X-Stream-Id")
    g.add_argument("--corruptions", default=None,
                   help=f"comma-separated domains, 'name' (at --severity) or 'name-severity' or 'clean' (default: "
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
    b = p.add_argument_group("bounds and transport")
    b.add_argument("--images-per-stream", type=int, default=None, help="stop each stream after this many images")
    b.add_argument("--duration", type=float, default=None, help="stop all streams after this many seconds")
    b.add_argument("--format", dest="fmt", choices=("npy", "png"), default="npy",
                   help="request body: application/x-npy (default) or multipart PNG files")
    b.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    b.add_argument("--max-retries", type=int, default=20, help="retries of a batch answered 429/503")
    b.add_argument("--wait-ready", type=float, default=30.0, help="seconds to wait for the server's /readyz")
    b.add_argument("--no-reset", action="store_true", help="do not reset the streams before replaying")
    b.add_argument("--token", default=os.environ.get("MGG_ADMIN_TOKEN"),
                   help="admin bearer token for /reset (default: $MGG_ADMIN_TOKEN)")
    b.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
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
    p.set_defaults(func=main)
    return p


def _spec_options(args: argparse.Namespace) -> SpecOptions:
    corruptions = [c.strip() for c in args.corruptions.split(",") if c.strip()] if args.corruptions else None
    return SpecOptions(data=args.data, spec_file=args.spec, corruptions=corruptions, severity=args.severity,
                       profile=args.profile,
                       images_per_domain=args.images_per_domain or None, batch_size=args.batch_size,
                       order=args.order, reset=args.reset, label_shift=args.label_shift,
                       domain_order=args.domain_order, seed=args.seed, streams=args.streams)


def replay(args: argparse.Namespace, url: str, mode: str, run_id: str,
           extra_protocol: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one replay against ``url``; returns the report (not yet written)."""
    import httpx

    opts = _spec_options(args)
    prefix = args.stream_prefix or f"replay-{run_id}"
    plans, class_names, spec = build_plans(opts, prefix, args.fmt)
    cfg = ReplayConfig(url=url.rstrip("/"), fmt=args.fmt, duration_s=args.duration,
                       images_per_stream=args.images_per_stream, timeout_s=args.timeout,
                       max_retries=args.max_retries, reset_at_start=not args.no_reset, token=args.token,
                       progress=not args.no_progress)
    with httpx.Client() as client:
        try:
            wait_ready(client, cfg.url, max(float(args.wait_ready), 0.5))
        except (TimeoutError, RuntimeError) as exc:
            detail = ""
            try:
                detail = client.get(cfg.url + "/readyz", timeout=5).text[:400]
            except httpx.HTTPError:
                pass
            raise SystemExit(f"mgg replay: {exc} {detail}".rstrip()) from None
        info = server_info(client, cfg.url)
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


def write_report(report: dict[str, Any], out_dir: Path, stem: str) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    report["files"] = {k: str(v) for k, v in paths.items()}
    paths["json"].write_text(json.dumps(report, indent=2, default=_json_default) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown_summary(report), encoding="utf-8")
    plot_report(report, paths["png"])
    return {k: str(v) for k, v in paths.items()}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    if report.get("schema") != REPORT_SCHEMA:
        raise ValueError(f"{path}: not a replay report (schema {report.get('schema')!r}, expected {REPORT_SCHEMA!r})")
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
        raise SystemExit(f"mgg replay --baseline: {url} adapts (method {method!r}); a baseline needs MGG_METHOD=noadapt")
    return replay(args, url, "baseline", run_id, {"baseline": {"how": how, "url": url, "server_method": method}})


def main(args: argparse.Namespace) -> int:
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
    print(f"mgg replay ({report['mode']}): accuracy {_fmt_pct(s['accuracy'])} on {s['images_answered']} images, "
          f"{_fmt_num(s['throughput_img_s'])} img/s, latency p50/p95/p99 {_fmt_num(lat['p50_ms'])}/"
          f"{_fmt_num(lat['p95_ms'])}/{_fmt_num(lat['p99_ms'])} ms, errors {s['errors']['total']}"
          f"{' ' + json.dumps(s['errors']['by_status']) if s['errors']['by_status'] else ''}")
    print(f"  report: {files['json']}\n  summary: {files['md']}\n  plot: {files['png']}")
    if args.compare:
        print(report["comparison"]["table"])
    return 0 if s["requests_failed"] == 0 else 1
