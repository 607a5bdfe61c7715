"""StreamStore: per-stream adaptation state with strict ordering, a memory budget and durable disk snapshots.

Ordering. Every operation on a stream (predict, reset, delete, snapshot) takes a *ticket* in that stream's
chain; a ticket's job starts only after the previous ticket of the same stream has finished. A job runs as its
own task, so a client that disconnects mid-step cannot let the next batch overtake the running one.

Concurrency. Jobs of different streams run concurrently, at most ``max_concurrent`` at a time (the torch work
runs in worker threads). :meth:`StreamStore.run_fused` hands the step to a fused-step scheduler
(:mod:`service.scheduler`) instead, which bounds its own concurrent calls; the ticket is held until the answer.
Past ``max_queue_per_stream`` waiting/running requests on one stream, or ``max_queue_total`` over all streams,
:class:`StoreBusy` is raised (HTTP 429).

Durability. With ``durability="step"`` (the default) a predict job writes the stream's snapshot
(``<snapshot_dir>/<id>.safetensors``, through :mod:`mgg_core.io`: temp file, fsync, rename, fsync of the folder)
before its result is returned, so an acknowledged step survives ``kill -9``. When
that write fails the in-memory state is dropped (the stream is back at its last durable state) and
:class:`PersistError` is raised: the step is not acknowledged.

Group commit (``durability="step"``, ``commit_group_max_streams`` > 1). The snapshots of the steps that finish
together (the streams of one fused call, and whatever finished while the previous group was being written) are
written as one group, at most ``commit_group_max_streams`` streams, by :func:`mgg_core.io.atomic_write_group`:
every temp file written and fsynced, then every rename, then one fsync of the folder; one group is written at a
time, while the next fused call computes. The group is all or nothing: when any of its files cannot be written
(an I/O error, or the group would pass ``max_snapshot_bytes``) no snapshot is replaced, every stream of the group
is reverted to its last durable state and every one gets :class:`PersistError`. Only a rename failing after the
fsyncs (an I/O error of the folder itself) splits a group: the streams renamed before it are durable and
acknowledged, the rest are reverted and refused. A ``kill -9`` mid-group leaves each stream's snapshot either
the old or the new complete file: no acknowledged step is lost (a stream whose new file was renamed just before
the crash keeps that unanswered step, as a single write's crash between rename and answer always could; a retry
with its ``Idempotency-Key`` gets the recorded answer). ``commit_group_max_streams=1`` writes every stream on
its own, as before group commit. With ``durability="interval"`` snapshots are
written in the background once a stream has ``snapshot_interval_steps`` unpersisted steps or its oldest one is
``snapshot_interval_seconds`` old; a crash loses at most that much per stream (gauge ``tta_steps_unpersisted``).

Memory. Resident states are kept in LRU order; when their total ``state.nbytes()`` exceeds the budget, the
least recently used idle streams are unloaded, after the request that tripped the budget has been answered
(never in its critical path). A stream whose state is on disk is simply dropped; one with unpersisted steps
(interval mode) is written first and dropped even when the write fails (its lost steps are counted in
``tta_steps_lost_total``), so the budget holds whatever the disk does. Streams idle for ``idle_seconds`` are
unloaded too. ``reset_all`` resets non-resident streams on disk without loading them.

Bounds. At most ``max_streams`` streams are known (resident, on disk, at source or queued) and at most
``max_snapshot_bytes`` of snapshots are on disk: a new stream past either is refused with :class:`StoreFull`
(HTTP 507), and a write that would pass the disk cap fails. Snapshots of streams idle for
``retention_seconds`` are deleted and the streams forgotten.

Restore. Snapshots are validated before use (file size, engine fingerprint, tensor keys, shapes, dtypes,
finiteness, scalar types) and their listing data by field type at start-up; a bad file makes only its own stream
answer :class:`SnapshotRestoreError` (``reason`` is a safe, path-free description) until it is reset or deleted.

Listing data. What ``GET /streams`` shows of a stream that is not resident (step, bytes, entropy EMA, last seen,
requests, rollbacks) is kept in its snapshot's own safetensors header (metadata key ``listing``, JSON), read at
start-up from the header alone: one file per stream and per write. Snapshot folders of versions that kept it in a
``<id>.json`` sidecar still load: a header without ``listing`` is listed from that sidecar, which the stream's
next write removes (a header's listing wins over a sidecar left behind).
"""
from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic import Field as PydField

from mgg_core.io import GroupWriteError, atomic_write_group, fsync_dir

from .metrics import ServiceMetrics

if TYPE_CHECKING:  # torch loads lazily
    from mgg_core.engine import AdaptationEngine
    from mgg_core.state import StreamState

__all__ = [
    "DURABILITY_MODES", "PersistError", "Refused", "SnapshotMeta", "SnapshotRestoreError", "StoreBusy", "StoreClosed",
    "StoreFull", "StreamStore", "Ticket", "UnknownStream", "valid_stream_id",
]

log = logging.getLogger("mgg.service.store")
DURABILITY_MODES = ("step", "interval")

STREAM_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
SNAPSHOT_SUFFIX = ".safetensors"
META_SUFFIX = ".json"  # an older version's listing sidecar, read and removed (module docstring, "Listing data")
LISTING_KEY = "listing"  # the snapshot header's metadata key of the listing data
TMP_DIRNAME = ".tmp"

T = TypeVar("T")


def valid_stream_id(stream_id: str) -> bool:
    return bool(STREAM_ID_RE.fullmatch(stream_id or ""))


class StoreBusy(Exception):
    def __init__(self, queue: str, message: str) -> None:
        super().__init__(message)
        self.queue = queue
        self.message = message


class StoreFull(Exception):
    """A bound on streams (``kind="streams"``) or snapshot disk (``kind="disk"``) refuses a new stream (507)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.code = "too_many_streams" if kind == "streams" else "snapshot_disk_full"
        self.message = message


class StoreClosed(Exception):
    pass


class UnknownStream(KeyError):
    def __init__(self, stream_id: str) -> None:
        super().__init__(stream_id)
        self.stream_id = stream_id


class SnapshotRestoreError(RuntimeError):
    """A stream's files on disk cannot be used; ``message`` is safe to show (no paths, no exception text)."""

    def __init__(self, stream_id: str, reason: str) -> None:
        self.message = f"stream {stream_id!r}: its snapshot cannot be restored ({reason})"
        super().__init__(self.message)
        self.stream_id = stream_id
        self.reason = reason


class Refused(Exception):
    """Raised by a job's ``fn`` (:meth:`StreamStore.run`) that refused its request before changing the state (an
    idempotent replay, a reused key): nothing is reverted, marked changed or counted, and ``error`` is re-raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class PersistError(RuntimeError):
    """A durable write failed; ``message`` is safe to show. The step it was for is not acknowledged."""

    def __init__(self, stream_id: str, disk_full: bool) -> None:
        what = "the snapshot disk limit is reached" if disk_full else "the snapshot could not be written"
        self.message = f"stream {stream_id!r}: {what}; the step was not kept, retry later"
        super().__init__(self.message)
        self.stream_id = stream_id
        self.disk_full = disk_full


class _DiskCapReached(OSError):
    pass


class _GroupSplit(OSError):
    """A group write failed at a rename: the streams in ``committed`` are durable (``sizes``: the bytes of each
    written stream's files, by stream id), the others are not."""

    def __init__(self, sizes: dict[str, int], committed: set[str], error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.sizes = sizes
        self.committed = committed


@dataclass(eq=False)
class _Commit:
    """One acknowledged-to-be step waiting for its group's durable write."""

    entry: _Stream
    durable: tuple[Any, ...]  # the listing as on disk, restored on failure
    fut: asyncio.Future


class SnapshotMeta(BaseModel):
    """A snapshot's listing data (its header's ``listing``, or an older version's ``<id>.json`` sidecar), validated
    by type at start-up; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    step: int | None = PydField(None, ge=0)
    bytes: int = PydField(0, ge=0)
    entropy_ema: float | None = PydField(None, allow_inf_nan=False)
    last_seen: str | None = None
    requests: int = PydField(0, ge=0)
    rollbacks: int = PydField(0, ge=0)


class _StoreMetrics:
    """The store's own collectors, registered in the app's registry."""

    def __init__(self, m: ServiceMetrics) -> None:
        r = m.registry
        self.unpersisted = Gauge(
            "tta_steps_unpersisted", "Acknowledged adaptation steps not yet on disk (a crash now would lose them).",
            registry=r)
        self.lost = Counter("tta_steps_lost_total", "Acknowledged steps dropped without being persisted.",
                            ["reason"], registry=r)
        self.disk_bytes = Gauge("tta_snapshot_bytes", "Bytes of stream snapshots on disk.", registry=r)
        self.disk_budget = Gauge("tta_snapshot_budget_bytes", "Configured snapshot disk limit.", registry=r)
        self.refused = Counter("tta_streams_refused_total", "New streams refused by a bound (507).", ["reason"],
                               registry=r)
        self.restore_failed = Counter("tta_snapshot_restore_failed_total",
                                      "Requests refused because their stream's files are invalid.", registry=r)
        self.expired = Counter("tta_streams_expired_total", "Idle streams forgotten after the retention time.",
                               registry=r)
        self.commit_group = Histogram(
            "tta_commit_group_streams", "Streams whose snapshots one durable write (group commit) carried.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)


@dataclass
class _Stream:
    id: str
    state: StreamState | None = None  # when resident
    on_disk: bool = False  # a snapshot file exists
    fresh: bool = False  # at the exact source state with nothing on disk (after a reset)
    dirty: bool = False  # resident state differs from the snapshot on disk (or there is none)
    invalid: str | None = None  # why its files cannot be used (safe to show); cleared by reset/delete
    tail: asyncio.Future | None = None  # completion of the last ticket in this stream's chain
    pending: int = 0  # tickets not yet released (requests and internal jobs)
    queued: int = 0  # predict requests among them (what the per-stream queue bound counts)
    last_seen: float | None = None  # unix time of the last request
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    disk_bytes: int = 0  # snapshot (+ an older version's sidecar) on disk
    unpersisted: int = 0  # acknowledged steps not on disk
    unpersisted_since: float | None = None  # monotonic time of the oldest of them
    step: int | None = None
    entropy_ema: float | None = None
    requests: int = 0
    rollbacks: int = 0

    @property
    def known(self) -> bool:
        return self.state is not None or self.on_disk or self.fresh

    def refresh(self, state: StreamState) -> None:
        self.step = int(state.step)
        ema = state.entropy_ema
        self.entropy_ema = None if ema is None else float(ema)
        self.nbytes = int(state.nbytes())
        self.rollbacks = int(state.rollbacks)  # the collapse guard's count, kept in snapshots

    def info(self) -> dict[str, Any]:
        return {
            "stream_id": self.id,
            "step": self.step,
            "bytes": self.nbytes,
            "resident": self.state is not None,
            "snapshot": self.on_disk,
            "last_seen": _iso(self.last_seen),
            "entropy_ema": self.entropy_ema,
            "pending": self.pending,
            "requests": self.requests,
            "rollbacks": self.rollbacks,
            "unpersisted_steps": self.unpersisted,
            "error": self.invalid,
        }


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_iso(value: Any) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Ticket:
    """A place in one stream's chain of operations."""

    def __init__(self, store: StreamStore, entry: _Stream, counted: bool) -> None:
        self._store = store
        self.entry = entry
        self._counted = counted
        self._prev = entry.tail
        self._done: asyncio.Future = asyncio.get_running_loop().create_future()
        entry.tail = self._done
        entry.pending += 1
        if counted:
            entry.queued += 1
            store._queued_ids.add(entry.id)
            store._pending_total += 1
            store._metrics.queue_depth.set(store._pending_total)
        self._released = False
        self._owned_by_job = False

    @property
    def stream_id(self) -> str:
        return self.entry.id

    async def wait_turn(self) -> None:
        prev = self._prev
        if prev is not None and not prev.done():
            await asyncio.shield(prev)  # shield: our cancellation must not complete prev early

    def abandon(self) -> None:
        """Give the place up without running (e.g. the request body was invalid)."""
        if not self._owned_by_job:
            self.release()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        entry, store = self.entry, self._store
        entry.pending -= 1
        if self._counted:
            entry.queued -= 1
            if entry.queued == 0:
                store._queued_ids.discard(entry.id)
            store._pending_total -= 1
            store._metrics.queue_depth.set(store._pending_total)
        done, prev = self._done, self._prev
        if prev is None or prev.done():
            done.set_result(None)
        else:  # our turn never came (cancelled while waiting): finish only after prev does
            prev.add_done_callback(lambda _f: done.done() or done.set_result(None))  # type: ignore[func-returns-value]
        if entry.pending == 0 and not entry.known and store._streams.get(entry.id) is entry:
            del store._streams[entry.id]  # a placeholder that never got state


class StreamStore:
    def __init__(
        self,
        engine: AdaptationEngine,
        snapshot_dir: str | os.PathLike[str],
        *,
        metrics: ServiceMetrics,
        budget_bytes: int,
        max_concurrent: int = 2,
        max_queue_per_stream: int = 16,
        max_queue_total: int = 256,
        idle_seconds: float = 900.0,
        idle_check_seconds: float = 30.0,
        durability: str = "step",
        snapshot_interval_steps: int = 32,
        snapshot_interval_seconds: float = 5.0,
        max_streams: int = 10_000,
        max_snapshot_bytes: int = 10 * 1024**3,
        retention_seconds: float | None = None,
        commit_group_max_streams: int = 64,
    ) -> None:
        """Args:
            engine: the shared adaptation engine (``new_state``, ``reset``, ``load_state``, ``fingerprint``).
            snapshot_dir: folder of ``<id>.safetensors`` snapshots (and older versions' ``<id>.json`` sidecars).
            metrics: the app's metrics; the store adds its own collectors to the same registry.
            budget_bytes: resident state bytes kept in memory (LRU eviction past it).
            durability: ``"step"`` (persist before answering) or ``"interval"`` (see the module docstring).
            max_streams, max_snapshot_bytes: bounds on known streams and snapshot bytes on disk.
            retention_seconds: forget streams idle this long (None: never).
            commit_group_max_streams: ``durability="step"``: streams whose snapshots go into one durable write
                (group commit, see the module docstring); 1 writes each stream on its own.
        """
        if commit_group_max_streams < 1:
            raise ValueError("commit_group_max_streams must be >= 1")
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        self.engine = engine
        self.snapshot_dir = Path(snapshot_dir)
        self.budget_bytes = int(budget_bytes)
        self.max_queue_per_stream = int(max_queue_per_stream)
        self.max_queue_total = int(max_queue_total)
        self.idle_seconds = float(idle_seconds)
        self.idle_check_seconds = float(idle_check_seconds)
        self.durability = durability
        self.interval_steps = int(snapshot_interval_steps)
        self.interval_seconds = float(snapshot_interval_seconds)
        self.max_streams = int(max_streams)
        self.max_snapshot_bytes = int(max_snapshot_bytes)
        self.retention_seconds = None if retention_seconds is None else float(retention_seconds)
        self.commit_group_max_streams = int(commit_group_max_streams)
        self._commit_queue: deque[_Commit] = deque()  # steps waiting for their group's durable write
        self._committing = False  # a group-commit writer task is running
        self._metrics = metrics
        self._m = _StoreMetrics(metrics)
        self._m.disk_budget.set(self.max_snapshot_bytes)
        self._streams: dict[str, _Stream] = {}
        self._legacy_sidecars: set[str] = set()  # streams with an older version's sidecar on disk
        # resident stream ids, least recent first -> the bytes counted for each in _resident_total (per-request
        # bookkeeping is O(1) in the number of streams: no sum over them on a request's path)
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._resident_total = 0
        self._sem = asyncio.Semaphore(max_concurrent)
        self._pending_total = 0
        self._queued_ids: set[str] = set()  # streams with predict requests waiting or running
        self._unpersisted_total = 0
        self._disk_total = 0
        self._file_estimate = 0  # bytes a new stream's files will take (set in start())
        self._template: dict[str, tuple[tuple[int, ...], Any, bool]] = {}  # key -> shape, dtype, may be NaN
        self._closed = False
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._budget_task: asyncio.Task | None = None
        self._jobs: set[asyncio.Task] = set()
        metrics.state_budget_bytes.set(self.budget_bytes)

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self._learn_template)
        await asyncio.to_thread(self._scan)
        # counted when scraped (in the event loop, like every change to _streams), wired only once the scan, which
        # fills _streams in a worker thread, is over: a scrape during it would iterate a dict that is growing
        self._metrics.streams_known.set_function(self.known_count)
        self._update_gauges()
        self._tasks.append(asyncio.create_task(self._idle_loop(), name="mgg-idle-eviction"))
        if self.durability == "interval":
            self._tasks.append(asyncio.create_task(self._flush_loop(), name="mgg-interval-snapshots"))

    def _learn_template(self) -> None:
        """What a valid state looks like (from a fresh one): keys, shapes, dtypes, which may hold NaN."""
        import torch

        state = self.engine.new_state()
        self._template = {
            k: (tuple(v.shape), v.dtype, bool((~torch.isfinite(v)).any())) for k, v in state.tensors.items()
        }
        # a state with an anchor is about twice the fresh one; safetensors header (listing included) on top
        self._file_estimate = 2 * int(state.nbytes()) + 16 * 1024

    def _scan(self) -> None:
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_dir / TMP_DIRNAME
        if tmp.exists():  # leftovers of an older layout's interrupted writes
            shutil.rmtree(tmp, ignore_errors=True)
        for leftover in self.snapshot_dir.glob(".*.tmp"):  # mgg_core.io temp files of interrupted writes
            with contextlib.suppress(OSError):
                leftover.unlink()
        for path in sorted(self.snapshot_dir.glob("*" + SNAPSHOT_SUFFIX)):
            sid = path.name[: -len(SNAPSHOT_SUFFIX)]
            if not valid_stream_id(sid) or not path.is_file():
                continue
            entry = _Stream(id=sid, on_disk=True)
            self._load_meta_into(entry)
            if entry.last_seen is None and entry.invalid is None:  # no date in the listing: the file's own
                with contextlib.suppress(OSError):
                    entry.last_seen = path.stat().st_mtime
            self._set_disk(entry, self._files_size(sid))
            self._streams[sid] = entry
        log.info("snapshot dir %s: %d stream(s) found", self.snapshot_dir, len(self._streams))

    def _load_meta_into(self, entry: _Stream) -> None:
        """Fill ``entry``'s listing fields from its snapshot's header (``listing``) or, for a snapshot of an older
        version, its ``<id>.json`` sidecar; marks it invalid when the listing data is."""
        text, source = self._read_listing(entry.id), "snapshot's listing data"
        if text is None:
            source = "sidecar file"
            path = self._meta_path(entry.id)
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                return  # listing data only: the snapshot itself is authoritative
            except OSError:
                text = "\0"
            if not text.strip():
                return  # an empty sidecar (a power loss right after its rename): as if missing
        try:
            raw = json.loads(text)
        except (OSError, ValueError):
            entry.invalid = f"its {source} is not valid JSON"
            log.error("stream %s: %s is not valid JSON", entry.id, source)
            return
        try:
            if not isinstance(raw, dict):
                raise ValueError("not an object")
            meta = SnapshotMeta.model_validate(raw)
        except (ValidationError, ValueError) as exc:
            fields = sorted({str(e["loc"][0]) for e in exc.errors() if e.get("loc")}) if isinstance(
                exc, ValidationError) else []
            entry.invalid = f"its {source} has invalid fields: " + ", ".join(fields) if fields else \
                f"its {source} is not a JSON object"
            log.error("stream %s: %s is invalid (%s)", entry.id, source, entry.invalid)
            return
        entry.step, entry.nbytes, entry.entropy_ema = meta.step, meta.bytes, meta.entropy_ema
        entry.last_seen = _parse_iso(meta.last_seen)
        entry.requests, entry.rollbacks = meta.requests, meta.rollbacks

    def _read_listing(self, stream_id: str) -> str | None:
        """The ``listing`` text of a snapshot's header (read without its tensors); None when the header has none
        or cannot be read (loading the snapshot then reports what is wrong with it)."""
        try:
            from safetensors import safe_open

            with safe_open(str(self._snapshot_path(stream_id)), framework="numpy") as f:  # the header only
                value = (f.metadata() or {}).get(LISTING_KEY)
        except Exception:  # noqa: BLE001 - a damaged file is its own stream's problem, reported when it loads
            return None
        return value if isinstance(value, str) else None

    async def close(self) -> None:
        """Refuse new work, wait for queued work, snapshot every changed resident stream."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        for task in self._tasks:  # let a snapshot being written finish rather than cancel it midway
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._budget_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._budget_task
        if self._jobs:
            await asyncio.gather(*list(self._jobs), return_exceptions=True)
        for entry in list(self._streams.values()):
            if entry.state is not None and entry.dirty:
                await self._snapshot_job(entry, reason="shutdown", unload=True)
        self._update_gauges()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------------------------- predict path

    def reserve(self, stream_id: str) -> Ticket:
        """Take a place in the stream's queue now, or raise StoreBusy/StoreFull/StoreClosed."""
        if self._closed:
            raise StoreClosed("the server is shutting down")
        entry = self._streams.get(stream_id)
        if entry is not None and entry.queued >= self.max_queue_per_stream:
            self._metrics.rejected.labels(queue="stream").inc()
            raise StoreBusy(
                "stream", f"stream {stream_id!r} already has {entry.queued} requests queued (limit "
                f"{self.max_queue_per_stream}); retry later"
            )
        if self._pending_total >= self.max_queue_total:
            self._metrics.rejected.labels(queue="global").inc()
            raise StoreBusy(
                "global", f"{self._pending_total} requests queued (limit {self.max_queue_total}); retry later"
            )
        if entry is None:
            self._admit_new_stream()
            entry = self._streams[stream_id] = _Stream(id=stream_id)
        return Ticket(self, entry, counted=True)

    def _admit_new_stream(self) -> None:
        if len(self._streams) >= self.max_streams:
            self._m.refused.labels(reason="streams").inc()
            raise StoreFull("streams", f"the server holds {len(self._streams)} streams, its limit; reuse a stream "
                            "id, or delete or reset streams that are no longer needed")
        if self._disk_total + self._file_estimate > self.max_snapshot_bytes:
            self._m.refused.labels(reason="disk").inc()
            raise StoreFull("disk", f"snapshots take {self._disk_total} bytes on disk and the limit is "
                            f"{self.max_snapshot_bytes}; delete streams that are no longer needed")

    async def run(self, ticket: Ticket, fn: Callable[[StreamState], T]) -> T:
        """Run ``fn(state)`` in a worker thread once the ticket's turn has come; state is loaded or created first.

        Under ``durability="step"`` the new state is on disk before this returns (else :class:`PersistError`).
        ``fn`` raising :class:`Refused` changed nothing: its error is re-raised, the stream is left as it was.
        The job runs as its own task and releases the ticket itself, whatever happens to the caller.
        """
        return await self._start_job(ticket, lambda state: asyncio.to_thread(fn, state), self._sem)

    async def run_fused(self, ticket: Ticket, submit: Callable[[StreamState], Awaitable[T]]) -> T:
        """As :meth:`run`, but the step is ``await submit(state)``: a :class:`service.scheduler.FusedScheduler`
        call that may include other streams and takes its own concurrency slot (``max_concurrent`` holds for
        fused calls there, not here). The ticket is held until the answer: the stream's next request waits for the
        next fused call. A restore failure, or a failed durable write, fails only this ticket's request."""
        return await self._start_job(ticket, submit, None)

    def queued_streams(self) -> set[str]:
        """Ids of the streams with predict requests waiting or running (the scheduler's ``incoming`` hint)."""
        return self._queued_ids

    async def _start_job(
        self, ticket: Ticket, call: Callable[[StreamState], Awaitable[T]], gate: asyncio.Semaphore | None
    ) -> T:
        ticket._owned_by_job = True
        task = asyncio.create_task(self._run_job(ticket, call, gate))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return await asyncio.shield(task)

    async def _run_job(
        self, ticket: Ticket, call: Callable[[StreamState], Awaitable[T]], gate: asyncio.Semaphore | None
    ) -> T:
        entry = ticket.entry
        try:
            await ticket.wait_turn()
            async with gate if gate is not None else contextlib.nullcontext():
                state = await self._ensure_resident(entry)
                durable = (entry.step, entry.entropy_ema, entry.rollbacks, entry.requests)  # listing, as on disk
                entry.last_seen = time.time()
                entry.requests += 1
                try:
                    result = await call(state)
                except Refused as refused:  # nothing changed: the resident state stays, clean or not
                    entry.requests = durable[3]
                    raise refused.error from None
                except BaseException:
                    if self.durability == "step":  # back to the last durable state: nothing half-done survives
                        self._revert(entry, durable)
                    else:
                        self._mark_changed(entry, state)
                    raise
                self._mark_changed(entry, state)
            if self.durability == "step":
                await self._persist_or_revert(entry, durable)
            elif entry.unpersisted >= self.interval_steps:
                self._spawn(self._snapshot_job(entry, reason="interval", unload=False))
        finally:
            ticket.release()
            self._enforce_budget_soon()
        return result

    def _mark_changed(self, entry: _Stream, state: Any) -> None:
        entry.dirty, entry.fresh = True, False
        entry.refresh(state)
        self._touch(entry)
        if entry.unpersisted == 0:
            entry.unpersisted_since = time.monotonic()
        entry.unpersisted += 1
        self._unpersisted_total += 1
        self._m.unpersisted.set(self._unpersisted_total)

    async def _persist_or_revert(self, entry: _Stream, durable: tuple[Any, ...]) -> None:
        """Write the stream now (alone, or in a commit group); on failure revert it (back to its last durable state)
        and raise :class:`PersistError`."""
        commit = _Commit(entry, durable, asyncio.get_running_loop().create_future())
        if self.commit_group_max_streams == 1:  # a group of one, written right here
            await self._commit_group([commit])
            await commit.fut  # None, or raises its PersistError
            return
        self._commit_queue.append(commit)
        if not self._committing:
            self._committing = True
            self._spawn(self._commit_loop())
        await commit.fut

    async def _commit_loop(self) -> None:
        """Write the queued steps group by group, one group at a time, until none is left."""
        group: builtins.list[_Commit] = []
        try:
            # the other streams of the same fused call were woken in the same pass of the event loop as the one
            # that started this task: by the time it runs they are queued, and go into the same group
            await asyncio.sleep(0)
            while self._commit_queue:
                take = min(len(self._commit_queue), self.commit_group_max_streams)
                group = [self._commit_queue.popleft() for _ in range(take)]
                await self._commit_group(group)
                group = []
        except BaseException as exc:  # cancelled (shutdown), or a bug: the unanswered steps are refused, nobody
            rest = [c for c in group if not c.fut.done()] + builtins.list(self._commit_queue)  # waits forever
            self._commit_queue.clear()
            self._persist_failed(rest, OSError(type(exc).__name__))
            if not isinstance(exc, Exception):
                raise
            log.exception("group commit failed")
        finally:
            self._committing = False

    async def _commit_group(self, group: builtins.list[_Commit]) -> None:
        """One durable write for ``group``; resolves every member's future (None, or PersistError)."""
        t0 = time.perf_counter()
        try:
            items = []
            for c in group:  # inside the try: a failure here, too, must answer every member (none may hang)
                assert c.entry.state is not None, "a stepped stream stays resident until its write (ticket held)"
                items.append((c.entry.id, c.entry.state, self._listing_meta(c.entry), c.entry.disk_bytes))
            sizes = await asyncio.to_thread(self._write_files, items)
        except _GroupSplit as split:  # renames failed midway: the renamed streams are durable
            # by id: a subclass may write a subset of the group (the Ray shard drops streams that moved)
            done = [(c, split.sizes[c.entry.id]) for c in group if c.entry.id in split.committed]
            self._commit_done(done, time.perf_counter() - t0)
            self._persist_failed([c for c in group if c.entry.id not in split.committed], split)
            return
        except OSError as exc:
            self._persist_failed(group, exc)
            return
        except BaseException as exc:  # a bug: nobody may wait forever, nobody is acknowledged
            self._persist_failed(group, OSError(str(exc)))
            if not isinstance(exc, Exception):
                raise
            log.exception("group commit failed")
            return
        self._commit_done(list(zip(group, sizes, strict=True)), time.perf_counter() - t0)

    def _commit_done(self, done: builtins.list[tuple[_Commit, int]], seconds: float) -> None:
        if done:
            self._m.commit_group.observe(len(done))
            self._metrics.snapshot_duration.observe(seconds)
        for commit, size in done:
            self._written(commit.entry, size)
            self._metrics.observe_phase("snapshot", seconds)
            self._metrics.snapshots.labels(reason="step").inc()
            if not commit.fut.done():
                commit.fut.set_result(None)

    def _persist_failed(self, group: builtins.list[_Commit], exc: OSError) -> None:
        """Revert every stream of ``group`` to its last durable state; their requests get PersistError."""
        if not group:
            return
        log.error("stream(s) %s: durable write failed (%s); the step(s) are not acknowledged",
                  ", ".join(c.entry.id for c in group), exc)
        for commit in group:
            self._metrics.snapshot_errors.labels(op="write").inc()
            self._revert(commit.entry, commit.durable)
            if not commit.fut.done():
                commit.fut.set_exception(PersistError(commit.entry.id, disk_full=isinstance(exc, _DiskCapReached)))

    def _revert(self, entry: _Stream, durable: tuple[Any, ...]) -> None:
        """Forget the resident state: the next request restores the last durable one (or the source state)."""
        self._set_persisted(entry)
        self._drop_state(entry)
        entry.step, entry.entropy_ema, entry.rollbacks, entry.requests = durable

    def _forget_unpersisted(self, entry: _Stream, reason: str) -> None:
        if entry.unpersisted:
            self._m.lost.labels(reason=reason).inc(entry.unpersisted)
            self._set_persisted(entry)

    def _set_persisted(self, entry: _Stream) -> None:
        self._unpersisted_total -= entry.unpersisted
        entry.unpersisted, entry.unpersisted_since = 0, None
        self._m.unpersisted.set(self._unpersisted_total)

    async def _ensure_resident(self, entry: _Stream) -> StreamState:
        if entry.state is not None:
            return entry.state
        if entry.invalid is not None:
            self._m.restore_failed.inc()
            raise SnapshotRestoreError(entry.id, entry.invalid)
        if entry.on_disk:
            t0 = time.perf_counter()
            try:
                state = await asyncio.to_thread(self._load_state, entry.id)
            except _InvalidSnapshot as exc:
                self._metrics.snapshot_errors.labels(op="restore").inc()
                self._m.restore_failed.inc()
                log.error("stream %s: snapshot %s refused: %s", entry.id, self._snapshot_path(entry.id), exc.reason)
                raise SnapshotRestoreError(entry.id, exc.reason) from None
            self._metrics.observe_phase("restore", time.perf_counter() - t0)
            self._metrics.snapshot_restores.inc()
            entry.dirty = False
        else:
            state = await asyncio.to_thread(self.engine.new_state)
            entry.dirty = not entry.fresh
        entry.state = state
        entry.refresh(state)
        self._touch(entry)
        return state

    # ------------------------------------------------------------------------------ restore checks

    def _load_state(self, stream_id: str) -> StreamState:
        """Load and validate a snapshot; raises :class:`_InvalidSnapshot` with a safe reason."""
        path = self._snapshot_path(stream_id)
        try:
            size = path.stat().st_size
        except OSError:
            raise _InvalidSnapshot("its snapshot file is missing") from None
        if size > 4 * self._file_estimate + 1024 * 1024:
            raise _InvalidSnapshot(f"its snapshot file is {size} bytes, far larger than a state of this engine")
        self._check_fingerprint(path)
        try:
            state = self.engine.load_state(path)
        except Exception as exc:  # any failure of a tampered file is that stream's problem only
            log.debug("loading %s failed", path, exc_info=True)
            raise _InvalidSnapshot("the file is not a readable stream-state snapshot") from exc
        self._check_state(state)
        return state

    def _check_fingerprint(self, path: Path) -> None:
        expected = getattr(self.engine, "fingerprint", None)
        if not isinstance(expected, dict):
            return
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:  # reads the header only
                meta = f.metadata() or {}
            found = json.loads(meta["fingerprint"])
        except Exception as exc:
            raise _InvalidSnapshot("the file is not a readable stream-state snapshot") from exc
        if found != expected:
            diff = sorted(str(k) for k in set(found) | set(expected) if found.get(k) != expected.get(k)) \
                if isinstance(found, dict) else ["fingerprint"]
            raise _InvalidSnapshot("it was made by a differently configured engine (differs in "
                                   f"{', '.join(diff)}); POST /reset this stream to start over")

    def _check_state(self, state: Any) -> None:
        import torch

        groups = [("state", getattr(state, "tensors", None))]
        anchor = getattr(state, "anchor", None)
        if anchor is not None:
            groups.append(("anchor", anchor))
        for label, tensors in groups:
            if not isinstance(tensors, dict):
                raise _InvalidSnapshot(f"its {label} tensors are missing")
            missing = sorted(set(self._template) - set(tensors)) if label == "state" else []
            extra = sorted(set(tensors) - set(self._template))
            if missing or extra:
                raise _InvalidSnapshot(f"its {label} tensors differ from this engine's: missing {missing[:5]}, "
                                       f"unexpected {extra[:5]}")
            for key, t in tensors.items():
                shape, dtype, may_nan = self._template[key]
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                    got = (tuple(t.shape), str(t.dtype)) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise _InvalidSnapshot(f"{label} tensor {key!r} is {got}, expected {shape} {dtype}")
                bad = torch.isinf(t).any() if may_nan else ~torch.isfinite(t).all()
                if bool(bad):
                    raise _InvalidSnapshot(f"{label} tensor {key!r} holds non-finite values")
        for name in ("step", "batches", "images", "skipped", "resets", "rollbacks", "anchor_step", "healthy_streak"):
            v = getattr(state, name, 0)
            if type(v) is not int or v < 0:
                raise _InvalidSnapshot(f"its scalar {name!r} is not a non-negative integer")

    # ------------------------------------------------------------------------------------ admin ops

    async def _admin(self, stream_id: str, op: Callable[[_Stream], Any]) -> Any:
        entry = self._streams.get(stream_id)
        if entry is None or not entry.known:
            raise UnknownStream(stream_id)
        ticket = Ticket(self, entry, counted=False)
        ticket._owned_by_job = True

        async def job() -> Any:
            try:
                await ticket.wait_turn()
                if not entry.known:  # deleted while we waited
                    raise UnknownStream(stream_id)
                return await op(entry)
            finally:
                ticket.release()

        task = asyncio.create_task(job())
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return await asyncio.shield(task)

    async def reset(self, stream_id: str, reason: str = "request") -> dict[str, Any]:
        """Restore the stream's source state exactly; its files are removed (the source state needs none).

        A resident stream is reset in place; a stream that is only on disk stays there (nothing is loaded).
        """

        async def op(entry: _Stream) -> dict[str, Any]:
            await asyncio.to_thread(self._remove_files, entry.id)
            self._set_disk(entry, 0)
            entry.on_disk, entry.fresh, entry.invalid, entry.dirty = False, True, None, False
            self._set_persisted(entry)  # nothing before the reset is worth keeping any more
            if entry.state is not None:
                await asyncio.to_thread(self.engine.reset, entry.state)
                entry.refresh(entry.state)
                self._touch(entry)
            else:
                entry.step, entry.entropy_ema = 0, None
            self._metrics.resets.labels(reason=reason).inc()
            return entry.info()

        return await self._admin(stream_id, op)

    async def reset_all(self) -> builtins.list[str]:
        """Reset every known stream, one at a time in its own chain; memory use does not grow."""
        done = []
        for sid in [sid for sid, e in self._streams.items() if e.known]:
            with contextlib.suppress(UnknownStream):
                await self.reset(sid, reason="all")
                done.append(sid)
        return done

    async def delete(self, stream_id: str) -> None:
        async def op(entry: _Stream) -> None:
            await asyncio.to_thread(self._remove_files, entry.id)
            self._set_disk(entry, 0)
            entry.on_disk, entry.fresh, entry.invalid = False, False, None
            self._set_persisted(entry)
            self._drop_state(entry)

        await self._admin(stream_id, op)
        entry = self._streams.get(stream_id)
        if entry is not None and entry.pending == 0 and not entry.known:
            del self._streams[stream_id]
        self._update_gauges()

    async def snapshot(self, stream_id: str, reason: str = "request") -> dict[str, Any]:
        """Write the stream's snapshot now; raises :class:`PersistError` when the write fails."""
        entry = self._streams.get(stream_id)
        if entry is None or not entry.known:
            raise UnknownStream(stream_id)
        if not await self._snapshot_job(entry, reason=reason, unload=False, force=True):
            raise PersistError(stream_id, disk_full=self._disk_total + self._file_estimate > self.max_snapshot_bytes)
        return entry.info()

    async def unload(self, stream_id: str, reason: str = "request") -> bool:
        """Snapshot the stream (when changed) and drop it from memory, in its order; True when it is on disk."""
        entry = self._streams.get(stream_id)
        if entry is None or not entry.known:
            raise UnknownStream(stream_id)
        return await self._snapshot_job(entry, reason=reason, unload=True)

    # ------------------------------------------------------------------------------------- queries

    def info(self, stream_id: str) -> dict[str, Any]:
        entry = self._streams.get(stream_id)
        if entry is None or not entry.known:
            raise UnknownStream(stream_id)
        return entry.info()

    def list(self) -> builtins.list[dict[str, Any]]:
        return self.page()[0]

    def page(
        self, after: str | None = None, limit: int | None = None
    ) -> tuple[builtins.list[dict[str, Any]], str | None]:
        """Known streams sorted by id, those after ``after``, at most ``limit``; returns (page, next ``after``)."""
        ids = sorted(sid for sid, e in self._streams.items() if e.known and (after is None or sid > after))
        if limit is not None and len(ids) > limit:
            ids = ids[:limit]
            return [self._streams[sid].info() for sid in ids], ids[-1]
        return [self._streams[sid].info() for sid in ids], None

    @property
    def resident_bytes(self) -> int:
        """Bytes of the resident streams' states (kept up to date by :meth:`_touch` and :meth:`_drop_state`)."""
        return self._resident_total

    def known_count(self) -> int:
        """Streams in memory, on disk or new (O(streams): for ``/info`` and the metrics scrape, not per request)."""
        return sum(1 for e in self._streams.values() if e.known)

    @property
    def disk_bytes(self) -> int:
        return self._disk_total

    @property
    def unpersisted_steps(self) -> int:
        return self._unpersisted_total

    def stats(self) -> dict[str, Any]:
        return {
            "streams_known": self.known_count(),
            "streams_resident": len(self._lru),
            "state_bytes": self.resident_bytes,
            "state_budget_bytes": self.budget_bytes,
            "queue_depth": self._pending_total,
            "snapshot_bytes": self._disk_total,
            "snapshot_budget_bytes": self.max_snapshot_bytes,
            "steps_unpersisted": self._unpersisted_total,
        }

    # ---------------------------------------------------------------------------- memory & snapshots

    def _touch(self, entry: _Stream) -> None:
        entry.last_used = time.monotonic()
        if entry.state is not None:
            self._resident_total += entry.nbytes - self._lru.get(entry.id, 0)
            self._lru[entry.id] = entry.nbytes
            self._lru.move_to_end(entry.id)
        self._update_gauges()

    def _drop_state(self, entry: _Stream) -> None:
        entry.state = None  # nbytes is kept: the size it will have once restored
        entry.dirty = False
        self._resident_total -= self._lru.pop(entry.id, 0)
        self._update_gauges()

    def _set_disk(self, entry: _Stream, nbytes: int) -> None:
        self._disk_total += nbytes - entry.disk_bytes
        entry.disk_bytes = nbytes
        self._m.disk_bytes.set(self._disk_total)

    def _update_gauges(self) -> None:
        self._metrics.streams_active.set(len(self._lru))
        self._metrics.state_bytes.set(self.resident_bytes)
        self._m.unpersisted.set(self._unpersisted_total)
        self._m.disk_bytes.set(self._disk_total)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    def _enforce_budget_soon(self) -> None:
        """Unload least recently used idle streams past the budget, off the caller's path.

        Streams whose state is on disk (always the case under ``durability="step"``) are dropped at once (no
        I/O); streams with unpersisted steps are written and dropped by a background task.
        """
        if self.resident_bytes <= self.budget_bytes:
            return
        for sid in list(self._lru):
            if self.resident_bytes <= self.budget_bytes or len(self._lru) <= 1:
                break
            entry = self._streams[sid]
            if entry.pending == 0 and not entry.dirty:
                self._drop_state(entry)
                self._metrics.evictions.labels(reason="budget").inc()
        if self.resident_bytes > self.budget_bytes and (self._budget_task is None or self._budget_task.done()):
            self._budget_task = asyncio.create_task(self._evict_dirty(), name="mgg-budget-eviction")

    async def _evict_dirty(self) -> None:
        while self.resident_bytes > self.budget_bytes and len(self._lru) > 1:
            victim = next((self._streams[sid] for sid in self._lru if self._streams[sid].pending == 0), None)
            if victim is None:
                return
            await self._snapshot_job(victim, reason="budget", unload=True, unload_on_failure=True)

    async def _idle_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.idle_check_seconds)
                return
            try:
                await self.evict_idle()
                await self.expire()
            except Exception:
                log.exception("idle eviction failed")

    async def _flush_loop(self) -> None:
        """durability='interval': snapshot streams whose oldest unpersisted step is snapshot_interval_seconds old."""
        period = min(1.0, self.interval_seconds / 4)
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
                return
            now = time.monotonic()
            for entry in list(self._streams.values()):
                since = entry.unpersisted_since
                if entry.unpersisted and since is not None and now - since >= self.interval_seconds:
                    await self._snapshot_job(entry, reason="interval", unload=False)

    async def evict_idle(self, now: float | None = None) -> builtins.list[str]:  # `list` is a method here
        now = time.monotonic() if now is None else now
        evicted = []
        for sid in list(self._lru):
            if self._stop.is_set():
                break
            entry = self._streams.get(sid)
            if entry is None or entry.state is None or entry.pending:
                continue
            if now - entry.last_used >= self.idle_seconds and await self._snapshot_job(
                entry, reason="idle", unload=True
            ):
                evicted.append(sid)
        return evicted

    async def expire(self, now: float | None = None) -> builtins.list[str]:
        """Forget non-resident streams idle for ``retention_seconds`` and delete their files."""
        if self.retention_seconds is None:
            return []
        now = time.time() if now is None else now
        gone = []
        for sid, entry in list(self._streams.items()):
            if entry.state is not None or entry.pending or not entry.known:
                continue
            if entry.last_seen is None or now - entry.last_seen < self.retention_seconds:
                continue
            with contextlib.suppress(UnknownStream):
                await self.delete(sid)
                self._m.expired.inc()
                gone.append(sid)
        return gone

    async def _snapshot_job(
        self, entry: _Stream, *, reason: str, unload: bool, force: bool = False, unload_on_failure: bool = False
    ) -> bool:
        """Snapshot (when changed, or ``force``) and optionally unload, in the stream's chain. True on success.

        ``unload_on_failure`` drops the state even when the write fails (budget eviction: memory first); the
        unpersisted steps are then counted as lost.
        """
        ticket = Ticket(self, entry, counted=False)
        ticket._owned_by_job = True
        try:
            await ticket.wait_turn()
            if entry.state is None:
                return entry.on_disk or entry.fresh or not force
            if entry.dirty or (force and not entry.on_disk):
                try:
                    await self._write(entry)
                except OSError as exc:
                    self._metrics.snapshot_errors.labels(op="write").inc()
                    if unload_on_failure:
                        log.error("snapshot of stream %s failed (%s); unloading it anyway to stay within the memory "
                                  "budget: %d unpersisted step(s) lost", entry.id, exc, entry.unpersisted)
                        self._forget_unpersisted(entry, reason="evicted_write_failed")
                        self._drop_state(entry)
                        self._metrics.evictions.labels(reason=reason).inc()
                    else:
                        log.error("snapshot of stream %s failed (%s); keeping it in memory", entry.id, exc)
                    return False
                self._metrics.snapshots.labels(reason=reason).inc()
            if unload:
                self._drop_state(entry)
                self._metrics.evictions.labels(reason=reason).inc()
            return True
        finally:
            ticket.release()

    async def _write(self, entry: _Stream) -> None:
        """Write the resident state of ``entry`` durably, on its own (raises OSError); marks it clean and persisted."""
        assert entry.state is not None, "only resident streams are written"
        t0 = time.perf_counter()
        sizes = await asyncio.to_thread(
            self._write_files, [(entry.id, entry.state, self._listing_meta(entry), entry.disk_bytes)])
        dt = time.perf_counter() - t0
        self._metrics.snapshot_duration.observe(dt)
        self._metrics.observe_phase("snapshot", dt)
        self._written(entry, sizes[0])

    def _listing_meta(self, entry: _Stream) -> dict[str, Any]:
        return {k: v for k, v in entry.info().items() if k in SnapshotMeta.model_fields}

    def _written(self, entry: _Stream, size: int) -> None:
        """``entry``'s files (``size`` bytes) are durable: it is clean and persisted."""
        self._set_disk(entry, size)
        self._file_estimate = max(self._file_estimate, size)
        entry.on_disk, entry.dirty, entry.fresh = True, False, False
        self._set_persisted(entry)

    def _write_files(self, items: builtins.list[tuple[str, StreamState, dict[str, Any], int]]) -> builtins.list[int]:
        """Write the snapshots of ``items`` (stream id, state, listing fields, bytes its files take now) as one group
        (:func:`mgg_core.io.atomic_write_group`), the listing data in each snapshot's header; returns the bytes each
        stream's file takes.

        One file per stream: its listing data can never disagree with it. An older version's sidecar of a written
        stream is removed afterwards (a crash before that leaves it behind, ignored: the header's listing wins; the
        stream's next write removes it, :meth:`_files_size`).
        Raises :class:`_DiskCapReached` before writing anything when the group would pass ``max_snapshot_bytes``,
        :class:`_GroupSplit` when a rename failed after others succeeded.
        """
        files: builtins.list[tuple[Path, bytes, bool]] = []
        sizes: builtins.list[int] = []
        growth = 0
        saved_at = _iso(time.time())
        for stream_id, state, meta, old_size in items:
            data = state.to_bytes({LISTING_KEY: json.dumps({**meta, "saved_at": saved_at})})
            sizes.append(len(data))
            growth += sizes[-1] - old_size
            files.append((self._snapshot_path(stream_id), data, True))
        if self._disk_total + growth > self.max_snapshot_bytes:
            raise _DiskCapReached(f"snapshot disk limit of {self.max_snapshot_bytes} bytes reached")
        try:
            atomic_write_group(files)
        except GroupWriteError as exc:
            committed = {p.name[: -len(SNAPSHOT_SUFFIX)] for p in exc.replaced if p.name.endswith(SNAPSHOT_SUFFIX)}
            self._drop_sidecars(committed)  # their sizes count their snapshot alone
            raise _GroupSplit(dict(zip([item[0] for item in items], sizes, strict=True)), committed,
                              exc.error) from exc
        self._drop_sidecars([item[0] for item in items])
        return sizes

    def _drop_sidecars(self, stream_ids: Iterable[str]) -> None:
        """Remove the older version's sidecars of ``stream_ids``, whose snapshots were just written."""
        for stream_id in stream_ids:
            if stream_id in self._legacy_sidecars:
                self._legacy_sidecars.discard(stream_id)
                try:
                    self._meta_path(stream_id).unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:  # the snapshots are written: a stale sidecar is ignored anyway
                    log.warning("stream %s: could not remove its old sidecar file (%s)", stream_id, exc)

    def _snapshot_path(self, stream_id: str) -> Path:
        return self.snapshot_dir / f"{stream_id}{SNAPSHOT_SUFFIX}"

    def _meta_path(self, stream_id: str) -> Path:
        return self.snapshot_dir / f"{stream_id}{META_SUFFIX}"

    def _files_size(self, stream_id: str) -> int:
        """Bytes of the stream's files on disk: its snapshot and an older version's sidecar, which the stream's next
        write then removes (also one left next to a snapshot whose header has the listing: a crash before its
        removal), so that the bytes counted are the bytes on disk."""
        total = 0
        for p in (self._snapshot_path(stream_id), self._meta_path(stream_id)):
            with contextlib.suppress(OSError):
                total += p.stat().st_size
                if p.name.endswith(META_SUFFIX):
                    self._legacy_sidecars.add(stream_id)
        return total

    def _remove_files(self, stream_id: str) -> None:
        self._legacy_sidecars.discard(stream_id)
        for p in (self._snapshot_path(stream_id), self._meta_path(stream_id)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        fsync_dir(self.snapshot_dir)


class _InvalidSnapshot(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
