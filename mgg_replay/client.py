"""The replay itself: encode batches, POST them to ``/predict`` over concurrent streams, record every request.

One thread per stream (:class:`Replayer`), each with a prefetching encoder thread; answers 429/503 are retried
(``Retry-After``) up to ``max_retries``. Accuracy is counted from the labels the client knows.
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import platform
import queue
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .plans import Batch, StreamPlan

DEFAULT_URL = "http://127.0.0.1:8000"
STREAM_HEADER = "X-Stream-Id"


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
    for k, (pred, y) in enumerate(zip(predictions, labels, strict=False)):
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
        entry = {"stream_id": stream_id, "reason": reason, "status": r.status_code,
                 "t_s": time.perf_counter() - self._t0}
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
        prefetched = _Prefetcher(plan.make_batches(), self.cfg.fmt, self.cfg.prefetch, self._stop)
        for seq, (batch, enc) in enumerate(prefetched):
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
                        for ok_, d in zip(mask, batch.sample_domains, strict=False):
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
            ok = [(r.n, r.correct) for r in self.records if r.correct is not None]
            n = sum(k for k, _ in ok)
            c = sum(k for _, k in ok)
        if n:
            self._pbar.set_postfix(acc=f"{100.0 * c / n:.1f}%", refresh=False)

    def run(self) -> float:
        total = None
        sizes = [p.total_images for p in self.plans if p.total_images is not None]
        if len(sizes) == len(self.plans):
            total = sum(sizes)
            if self.cfg.images_per_stream is not None:
                total = sum(min(t, self.cfg.images_per_stream) for t in sizes)
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
