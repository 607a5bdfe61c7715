"""StreamStore: per-stream adaptation state with strict ordering, a memory budget and disk snapshots.

Ordering. Every operation on a stream (predict, reset, delete, eviction snapshot) takes a *ticket* in
that stream's chain when it arrives; a ticket's job starts only after the previous ticket of the same
stream has finished. Predict requests reserve their ticket before their body is read, so batches are
applied in arrival order even when a later request's body decodes faster. A job runs as its own
task, so a client that disconnects mid-step cannot let the next batch overtake the running one.

Concurrency. Jobs of different streams run concurrently, at most ``max_concurrent`` at a time (the
torch work runs in worker threads). Past ``max_queue_per_stream`` waiting/running requests on one
stream, or ``max_queue_total`` over all streams, :class:`StoreBusy` is raised (HTTP 429).

Memory. Resident states are kept in LRU order; when their total ``state.nbytes()`` exceeds the
budget, the least recently used idle streams are snapshotted and unloaded. Streams idle for
``idle_seconds`` are unloaded too. A stream that is not resident is restored from
``<snapshot_dir>/<stream_id>.safetensors`` on its next request. Snapshots are written to a temp file,
fsynced and renamed into place, so a crash never leaves a half-written snapshot under the real name.
``close()`` snapshots every changed resident stream (graceful shutdown).
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
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .metrics import ServiceMetrics

if TYPE_CHECKING:  # torch loads lazily
    from mgg_core.engine import AdaptationEngine
    from mgg_core.state import StreamState

log = logging.getLogger("mgg.service.store")

STREAM_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
SNAPSHOT_SUFFIX = ".safetensors"
META_SUFFIX = ".json"
TMP_DIRNAME = ".tmp"

T = TypeVar("T")


def valid_stream_id(stream_id: str) -> bool:
    return bool(STREAM_ID_RE.fullmatch(stream_id or ""))


class StoreBusy(Exception):
    def __init__(self, queue: str, message: str) -> None:
        super().__init__(message)
        self.queue = queue
        self.message = message


class StoreClosed(Exception):
    pass


class UnknownStream(KeyError):
    def __init__(self, stream_id: str) -> None:
        super().__init__(stream_id)
        self.stream_id = stream_id


class SnapshotRestoreError(RuntimeError):
    def __init__(self, stream_id: str, cause: BaseException) -> None:
        super().__init__(f"stream {stream_id!r}: cannot restore its snapshot ({type(cause).__name__}: {cause})")
        self.stream_id = stream_id


@dataclass
class _Stream:
    id: str
    state: StreamState | None = None  # when resident
    on_disk: bool = False  # a snapshot file exists
    dirty: bool = False  # resident state differs from the snapshot on disk (or there is none)
    tail: asyncio.Future | None = None  # completion of the last ticket in this stream's chain
    pending: int = 0  # tickets not yet released (requests and internal jobs)
    queued: int = 0  # predict requests among them (what the per-stream queue bound counts)
    last_seen: float | None = None  # unix time of the last request
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    step: int | None = None
    entropy_ema: float | None = None
    requests: int = 0
    rollbacks: int = 0

    @property
    def known(self) -> bool:
        return self.state is not None or self.on_disk

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
            store._pending_total += 1
            store._metrics.queue_depth.set(store._pending_total)
        self._released = False
        self._owned_by_job = False

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
    ) -> None:
        self.engine = engine
        self.snapshot_dir = Path(snapshot_dir)
        self.budget_bytes = int(budget_bytes)
        self.max_queue_per_stream = int(max_queue_per_stream)
        self.max_queue_total = int(max_queue_total)
        self.idle_seconds = float(idle_seconds)
        self.idle_check_seconds = float(idle_check_seconds)
        self._metrics = metrics
        self._streams: dict[str, _Stream] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident stream ids, least recent first
        self._sem = asyncio.Semaphore(max_concurrent)
        self._pending_total = 0
        self._closed = False
        self._idle_task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self._budget_lock = asyncio.Lock()
        self._jobs: set[asyncio.Task] = set()
        metrics.state_budget_bytes.set(self.budget_bytes)

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self._scan)
        self._update_gauges()
        self._idle_task = asyncio.create_task(self._idle_loop(), name="mgg-idle-eviction")

    def _scan(self) -> None:
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshot_dir / TMP_DIRNAME
        if tmp.exists():  # leftovers of writes interrupted by a crash
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(exist_ok=True)
        for path in sorted(self.snapshot_dir.glob("*" + SNAPSHOT_SUFFIX)):
            sid = path.name[: -len(SNAPSHOT_SUFFIX)]
            if not valid_stream_id(sid) or not path.is_file():
                continue
            entry = _Stream(id=sid, on_disk=True)
            meta = self._read_meta(sid)
            entry.step = meta.get("step")
            entry.nbytes = int(meta.get("bytes") or 0)
            entry.entropy_ema = meta.get("entropy_ema")
            entry.last_seen = _parse_iso(meta.get("last_seen"))
            entry.requests = int(meta.get("requests") or 0)
            entry.rollbacks = int(meta.get("rollbacks") or 0)
            self._streams[sid] = entry
        log.info("snapshot dir %s: %d stream(s) found", self.snapshot_dir, len(self._streams))

    async def close(self) -> None:
        """Refuse new work, wait for queued work, snapshot every changed resident stream."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._idle_task is not None:  # let it finish a snapshot it is writing rather than cancel it midway
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._idle_task
        for entry in list(self._streams.values()):
            if entry.state is not None:
                await self._snapshot_job(entry, reason="shutdown", unload=True)
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)
        self._update_gauges()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------------------------- predict path

    def reserve(self, stream_id: str) -> Ticket:
        """Take a place in the stream's queue now (arrival order) or raise StoreBusy/StoreClosed."""
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
            raise StoreBusy("global", f"{self._pending_total} requests queued (limit {self.max_queue_total}); retry later")
        if entry is None:
            entry = self._streams[stream_id] = _Stream(id=stream_id)
        return Ticket(self, entry, counted=True)

    async def run(self, ticket: Ticket, fn: Callable[[StreamState], T]) -> T:
        """Run ``fn(state)`` in a worker thread once the ticket's turn has come; state is loaded or created first.

        The job runs as its own task and releases the ticket itself, whatever happens to the caller.
        """
        ticket._owned_by_job = True
        task = asyncio.create_task(self._run_job(ticket, fn))
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return await asyncio.shield(task)

    async def _run_job(self, ticket: Ticket, fn: Callable[[StreamState], T]) -> T:
        entry = ticket.entry
        try:
            await ticket.wait_turn()
            async with self._sem:
                state = await self._ensure_resident(entry)
                entry.last_seen = time.time()
                entry.requests += 1
                try:
                    result = await asyncio.to_thread(fn, state)
                finally:
                    entry.dirty = True
                    entry.refresh(state)
                    self._touch(entry)
        finally:
            ticket.release()
        await self._enforce_budget()
        return result

    async def _ensure_resident(self, entry: _Stream) -> StreamState:
        if entry.state is not None:
            return entry.state
        if entry.on_disk:
            path = self._snapshot_path(entry.id)
            t0 = time.perf_counter()
            try:
                state = await asyncio.to_thread(self._load_state, path)
            except Exception as exc:
                self._metrics.snapshot_errors.labels(op="restore").inc()
                log.exception("restoring stream %s from %s failed", entry.id, path)
                raise SnapshotRestoreError(entry.id, exc) from exc
            self._metrics.observe_phase("restore", time.perf_counter() - t0)
            self._metrics.snapshot_restores.inc()
            entry.dirty = False
        else:
            state = await asyncio.to_thread(self.engine.new_state)
            entry.dirty = True
        entry.state = state
        entry.refresh(state)
        self._touch(entry)
        return state

    def _load_state(self, path: Path) -> StreamState:
        return self.engine.load_state(path)  # checks the snapshot was made by an engine of the same configuration

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
        """Restore the stream's source state exactly; its snapshot is removed (source needs none)."""

        async def op(entry: _Stream) -> dict[str, Any]:
            if entry.state is not None:
                await asyncio.to_thread(self.engine.reset, entry.state)
            else:
                entry.state = await asyncio.to_thread(self.engine.new_state)
            await asyncio.to_thread(self._remove_files, entry.id)
            entry.on_disk = False
            entry.dirty = True
            entry.refresh(entry.state)
            self._touch(entry)
            self._metrics.resets.labels(reason=reason).inc()
            return entry.info()

        info = await self._admin(stream_id, op)
        await self._enforce_budget()
        return info

    async def reset_all(self) -> list[str]:
        ids = [sid for sid, e in self._streams.items() if e.known]
        done = []
        for sid in ids:
            with contextlib.suppress(UnknownStream):
                await self.reset(sid, reason="all")
                done.append(sid)
        return done

    async def delete(self, stream_id: str) -> None:
        async def op(entry: _Stream) -> None:
            await asyncio.to_thread(self._remove_files, entry.id)
            entry.on_disk = False
            self._drop_state(entry)

        await self._admin(stream_id, op)
        entry = self._streams.get(stream_id)
        if entry is not None and entry.pending == 0 and not entry.known:
            del self._streams[stream_id]
        self._update_gauges()

    async def snapshot(self, stream_id: str, reason: str = "request") -> dict[str, Any]:
        entry = self._streams.get(stream_id)
        if entry is None or not entry.known:
            raise UnknownStream(stream_id)
        await self._snapshot_job(entry, reason=reason, unload=False)
        return entry.info()

    # ------------------------------------------------------------------------------------- queries

    def info(self, stream_id: str) -> dict[str, Any]:
        entry = self._streams.get(stream_id)
        if entry is None or not entry.known:
            raise UnknownStream(stream_id)
        return entry.info()

    def list(self) -> list[dict[str, Any]]:
        return [e.info() for _, e in sorted(self._streams.items()) if e.known]

    @property
    def resident_bytes(self) -> int:
        return sum(self._streams[sid].nbytes for sid in self._lru)

    def stats(self) -> dict[str, Any]:
        return {
            "streams_known": sum(1 for e in self._streams.values() if e.known),
            "streams_resident": len(self._lru),
            "state_bytes": self.resident_bytes,
            "state_budget_bytes": self.budget_bytes,
            "queue_depth": self._pending_total,
        }

    # ---------------------------------------------------------------------------- memory & snapshots

    def _touch(self, entry: _Stream) -> None:
        entry.last_used = time.monotonic()
        if entry.state is not None:
            self._lru[entry.id] = None
            self._lru.move_to_end(entry.id)
        self._update_gauges()

    def _drop_state(self, entry: _Stream) -> None:
        entry.state = None  # nbytes is kept: the size it will have once restored
        entry.dirty = False
        self._lru.pop(entry.id, None)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self._metrics.streams_active.set(len(self._lru))
        self._metrics.streams_known.set(sum(1 for e in self._streams.values() if e.known))
        self._metrics.state_bytes.set(self.resident_bytes)

    async def _enforce_budget(self) -> None:
        if self.resident_bytes <= self.budget_bytes or self._budget_lock.locked():
            return
        async with self._budget_lock:
            while self.resident_bytes > self.budget_bytes:
                # least recently used first; never a stream with queued work; keep at least one resident
                victim = next(
                    (self._streams[sid] for sid in self._lru if self._streams[sid].pending == 0), None
                )
                if victim is None or len(self._lru) <= 1:
                    return
                ok = await self._snapshot_job(victim, reason="budget", unload=True)
                if not ok:
                    return

    async def _idle_loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.idle_check_seconds)
                return
            try:
                await self.evict_idle()
            except Exception:
                log.exception("idle eviction failed")

    async def evict_idle(self, now: float | None = None) -> builtins.list[str]:  # `list` is a method of this class
        now = time.monotonic() if now is None else now
        evicted = []
        for sid in list(self._lru):
            if self._stop.is_set():
                break
            entry = self._streams.get(sid)
            if entry is None or entry.state is None or entry.pending:
                continue
            if now - entry.last_used >= self.idle_seconds:
                if await self._snapshot_job(entry, reason="idle", unload=True):
                    evicted.append(sid)
        return evicted

    async def _snapshot_job(self, entry: _Stream, *, reason: str, unload: bool) -> bool:
        """Snapshot (when changed) and optionally unload, in the stream's chain. True on success."""
        ticket = Ticket(self, entry, counted=False)
        ticket._owned_by_job = True
        try:
            await ticket.wait_turn()
            state = entry.state
            if state is None:
                return True
            if entry.dirty or not entry.on_disk:
                meta = entry.info()
                t0 = time.perf_counter()
                try:
                    await asyncio.to_thread(self._write_snapshot, entry.id, state, meta)
                except Exception:
                    self._metrics.snapshot_errors.labels(op="write").inc()
                    log.exception("snapshot of stream %s failed; keeping it in memory", entry.id)
                    return False
                dt = time.perf_counter() - t0
                self._metrics.snapshot_duration.observe(dt)
                self._metrics.observe_phase("snapshot", dt)
                self._metrics.snapshots.labels(reason=reason).inc()
                entry.on_disk = True
                entry.dirty = False
            if unload:
                self._drop_state(entry)
                self._metrics.evictions.labels(reason=reason).inc()
            return True
        finally:
            ticket.release()

    def _snapshot_path(self, stream_id: str) -> Path:
        return self.snapshot_dir / f"{stream_id}{SNAPSHOT_SUFFIX}"

    def _meta_path(self, stream_id: str) -> Path:
        return self.snapshot_dir / f"{stream_id}{META_SUFFIX}"

    def _read_meta(self, stream_id: str) -> dict[str, Any]:
        try:
            data = json.loads(self._meta_path(stream_id).read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_snapshot(self, stream_id: str, state: StreamState, meta: dict[str, Any]) -> None:
        tmp_dir = self.snapshot_dir / TMP_DIRNAME
        tmp_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        tmp_state = tmp_dir / f"{stream_id}.{token}{SNAPSHOT_SUFFIX}"
        tmp_meta = tmp_dir / f"{stream_id}.{token}{META_SUFFIX}"
        try:
            state.save(tmp_state)
            _fsync_file(tmp_state)
            meta = {**meta, "resident": False, "saved_at": _iso(time.time())}
            tmp_meta.write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _fsync_file(tmp_meta)
            os.replace(tmp_state, self._snapshot_path(stream_id))
            os.replace(tmp_meta, self._meta_path(stream_id))
            _fsync_dir(self.snapshot_dir)
        finally:
            for p in (tmp_state, tmp_meta):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _remove_files(self, stream_id: str) -> None:
        for p in (self._snapshot_path(stream_id), self._meta_path(stream_id)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
