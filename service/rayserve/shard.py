"""The shard replica: one engine + one stream store per Ray Serve replica, streams fenced by leases.

Contract. Each replica loads the same runtime as the single-process service (``load_runtime`` + a warm-up step)
and keeps a :class:`ShardStore` over the snapshot folder all replicas share. Every stream operation runs inside
the stream's lease (``lease.py``): when ownership changed since this replica last held the stream, its resident
copy is dropped and the stream is restored from the snapshot (or created, if it has none). After every step the
stream is snapshotted before the lease is released (``snapshot_every`` = 1: an acknowledged step survives the
loss of the replica). Methods return plain dicts ``{"status", "body", "headers", "served_by"}`` that the ingress
turns into HTTP responses; errors use the service's error codes and bodies.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..dataplane import DataPlane
from ..errors import ApiError
from ..metrics import ServiceMetrics
from ..runtime import ServiceState, freeze_startup_objects, load_runtime, warm_up
from ..settings import ServiceSettings
from ..store import (
    SNAPSHOT_SUFFIX,
    PersistError,
    SnapshotRestoreError,
    StoreBusy,
    StoreClosed,
    StoreFull,
    StreamStore,
    UnknownStream,
    _Stream,
    valid_stream_id,
)
from .lease import LeaseTable, LeaseTimeout

log = logging.getLogger("mgg.service.ray")


def reply(status: int, body: Any = None, headers: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"status": status, "body": body, "headers": headers or {}, **extra}


def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    return reply(status, {"error": {"code": code, "message": message}}, headers)


class ShardStore(StreamStore):
    """A StreamStore over a snapshot folder shared with other replicas.

    Differences from the single-process store: temp files in the folder are not wiped at start (other replicas
    are writing them); :meth:`adopt` forgets a resident copy so the next access restores the stream from disk;
    and files are written only while ``may_write(stream_id)`` holds (this replica still owns the stream's lease):
    an eviction or shutdown snapshot of a stream that moved to another replica is skipped, its copy dropped.
    ``last_write_s`` keeps the duration of each stream's last durable write (reported in the response).
    """

    may_write: Callable[[str], bool] = staticmethod(lambda _sid: True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_write_s: dict[str, float] = {}

    def _write_files(self, items: list[tuple[str, Any, dict[str, Any], int]]) -> list[int]:
        allowed = []
        for item in items:
            if self.may_write(item[0]):
                allowed.append(item)
            else:
                log.warning("stream %s moved to another replica: its stale copy here is dropped, not written",
                            item[0])
        t0 = time.perf_counter()
        sizes = dict(zip([i[0] for i in allowed], super()._write_files(allowed), strict=True)) if allowed else {}
        dt = time.perf_counter() - t0
        for stream_id in sizes:
            self.last_write_s[stream_id] = dt
        return [sizes.get(stream_id, old_size) for stream_id, _state, _meta, old_size in items]

    def _scan(self) -> None:
        """Like StreamStore._scan, without removing temp files (other replicas' writes in progress)."""
        self.snapshot_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.snapshot_dir.glob("*" + SNAPSHOT_SUFFIX)):
            sid = path.name[: -len(SNAPSHOT_SUFFIX)]
            if valid_stream_id(sid) and path.is_file():
                self._streams[sid] = self._from_disk(sid)

    def _from_disk(self, sid: str, entry: _Stream | None = None) -> _Stream:
        entry = entry or _Stream(id=sid)
        entry.on_disk, entry.invalid = True, None
        self._load_meta_into(entry)
        self._set_disk(entry, self._files_size(sid))
        return entry

    def adopt(self, stream_id: str) -> None:
        """Take the snapshot on disk as the truth for ``stream_id``: drop any resident copy, re-read metadata."""
        entry = self._streams.get(stream_id)
        on_disk = self._snapshot_path(stream_id).is_file()
        if entry is not None and entry.state is not None:
            self._set_persisted(entry)
            self._drop_state(entry)  # another replica advanced (or reset, or deleted) the stream since
        if on_disk:
            self._streams[stream_id] = self._from_disk(stream_id, entry)
            if entry is not None:
                entry.fresh = False
        elif entry is not None:
            self._set_disk(entry, 0)
            entry.on_disk, entry.fresh, entry.invalid = False, False, None
            if entry.pending == 0:
                del self._streams[stream_id]
        self._update_gauges()


class Shard:
    """The body of the shard deployment (wrapped by ``serve.deployment`` in :mod:`service.rayserve.app`).

    Args:
        settings: ``ServiceSettings.model_dump()`` of the service (model, method, limits, snapshot_dir, ...).
        lease_timeout_s: how long a stream operation waits for another replica's lease.
    """

    def __init__(self, settings: dict[str, Any], lease_timeout_s: float = 30.0) -> None:
        if settings.get("durability", "step") != "step":
            log.warning("the Ray backend snapshots every step (durability='step'): another replica may take any "
                        "stream over; durability=%r is ignored", settings["durability"])
        self.settings = ServiceSettings(**{**settings, "durability": "step"})
        self.replica_id = _replica_id()
        self.metrics = ServiceMetrics()
        self.svc = ServiceState(self.settings, self.metrics)  # what the service's DataPlane reads
        self.plane = DataPlane(self.svc)
        self.runtime = load_runtime(self.settings)
        self.warmup_seconds = warm_up(self.runtime)
        if self.settings.gc_freeze:
            freeze_startup_objects()
        self.leases = LeaseTable(self.settings.snapshot_dir, self.replica_id, lease_timeout_s)
        self.store: ShardStore | None = None
        self._start_lock = asyncio.Lock()
        rt = self.runtime
        self.metrics.set_build_info(version=_version(), model=rt.info["model"], method=self.settings.method,
                                    optimizer=rt.info["optimizer"] or "none", device=rt.device,
                                    torch=rt.info["torch"])
        self.metrics.ready.set(1)

    async def _store(self) -> ShardStore:
        async with self._start_lock:
            if self.store is None:
                s = self.settings
                store = ShardStore(  # the arguments of ServiceState._open_store; durability is always "step"
                    self.runtime.engine, s.snapshot_dir, metrics=self.metrics, budget_bytes=s.state_budget_bytes,
                    max_concurrent=s.max_concurrent_streams, max_queue_per_stream=s.max_queue_per_stream,
                    max_queue_total=s.max_queue_total, idle_seconds=s.idle_seconds,
                    idle_check_seconds=s.idle_check_seconds, durability="step",
                    max_streams=s.max_streams, max_snapshot_bytes=s.max_snapshot_bytes,
                    retention_seconds=s.snapshot_retention_seconds,
                )
                store.may_write = self.leases.holds
                await store.start()
                self.store = store
                self.svc.runtime, self.svc.store, self.svc.ready = self.runtime, store, True
                self.svc.scheduler = self.svc.open_scheduler(self.runtime, store)  # fused steps, as in mgg serve
            return self.store

    async def _with_stream(self, sid: str, fn: Callable[[ShardStore, Any], Awaitable[dict[str, Any]]]
                           ) -> dict[str, Any]:
        """Run ``fn`` under the stream's lease; shielded, so a cancelled call (the client hung up) still finishes
        its step, snapshot and lease record before the lease is released."""
        return await asyncio.shield(self._locked(sid, fn))

    async def _locked(self, sid: str, fn: Callable[[ShardStore, Any], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
        store = await self._store()
        try:
            async with self.leases.hold(sid) as lease:
                if lease.fresh:
                    store.adopt(sid)
                out = await fn(store, lease)
        except LeaseTimeout as exc:
            out = error(503, "stream_busy", str(exc), {"Retry-After": str(self.settings.retry_after_seconds)})
        except UnknownStream:
            out = error(404, "unknown_stream", f"no stream {sid!r}")
        except SnapshotRestoreError as exc:
            out = error(500, "snapshot_restore_failed", f"{exc.message}; POST /reset this stream to start over")
        except PersistError as exc:
            out = error(507, "snapshot_disk_full" if exc.disk_full else "snapshot_write_failed", exc.message)
        except StoreFull as exc:
            out = error(507, exc.code, exc.message)
        except StoreBusy as exc:
            code = "stream_queue_full" if exc.queue == "stream" else "queue_full"
            out = error(429, code, exc.message, {"Retry-After": str(self.settings.retry_after_seconds)})
        except StoreClosed as exc:
            out = error(503, "shutting_down", str(exc), {"Retry-After": "5"})
        except ApiError as exc:
            out = error(exc.status, exc.code, exc.message, exc.headers)
        out["served_by"] = self.replica_id
        return out

    # ------------------------------------------------------------------------------------------ stream ops

    async def predict(self, sid: str, body: bytes, content_type: str | None, request_id: str) -> dict[str, Any]:
        """Classify + adapt one batch of stream ``sid``; durable (snapshotted) before it returns."""
        async def op(store: ShardStore, lease: Any) -> dict[str, Any]:
            last = lease.record.get("last_request")
            if last == request_id and "last_response" in lease.record:
                return reply(200, lease.record["last_response"], replayed=True)  # a retry of an applied request
            out = await self._predict(store, sid, body, content_type)
            if out["status"] == 200:
                timings = out["body"]["timings"]
                timings["lease"] = lease.wait_s
                timings["snapshot"] = store.last_write_s.get(sid, 0.0)  # durable (store.run) before the answer
                t0 = time.perf_counter()
                await asyncio.to_thread(lease.commit, last_request=request_id, last_response=out["body"])
                timings["commit"] = time.perf_counter() - t0
            return out

        return await self._with_stream(sid, op)

    async def _predict(self, store: ShardStore, sid: str, body: bytes, content_type: str | None) -> dict[str, Any]:
        """The service's own predict path (``DataPlane``): decode, then one ordered step; 4xx touches no state."""
        ticket = self.plane.reserve(store, sid)
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            batch = await self.plane.decode(body, content_type)
            timings["decode"] = time.perf_counter() - t0
            try:
                resp = await self.plane.infer(self.runtime, store, ticket, sid, batch, timings)
            finally:
                batch.release()
        finally:
            ticket.abandon()
        return reply(200, resp.model_dump(mode="json"))

    async def infer_v2(self, sid: str, npy: bytes, request_id: str, sequence_id: int | str, start: bool,
                       end: bool) -> dict[str, Any]:
        """One V2 ``infer`` on stream ``sid``: the ingress parsed the request (``service.v2.codec``) and hands the
        input tensor as ``.npy`` bytes; the /predict path below it (decode, one ordered step), with
        ``sequence_start`` as a reset inside the step and ``sequence_end`` as an unload after it. The body is
        ``{"parameters": ..., "tensors": {name: nested list}}``; the ingress encodes the V2 response from it."""
        async def op(store: ShardStore, lease: Any) -> dict[str, Any]:
            last = lease.record.get("last_request")
            if last == request_id and "last_response" in lease.record:
                return reply(200, lease.record["last_response"], replayed=True)  # a retry of an applied request
            out = await self._infer_v2(store, sid, npy, sequence_id, start, end)
            if out["status"] == 200:
                await asyncio.to_thread(lease.commit, last_request=request_id, last_response=out["body"])
            return out

        return await self._with_stream(sid, op)

    async def _infer_v2(self, store: ShardStore, sid: str, npy: bytes, sequence_id: int | str, start: bool,
                        end: bool) -> dict[str, Any]:
        from ..v2.routes import NPY_MEDIA_TYPE, step_parameters, step_tensors

        ticket = self.plane.reserve(store, sid)
        try:
            batch = await self.plane.decode(npy, NPY_MEDIA_TYPE)
            try:
                step = await self.plane.step(self.runtime, store, ticket, batch, {}, reset_first=start)
            finally:
                batch.release()
        finally:
            ticket.abandon()
        unloaded = None
        if end:
            try:
                unloaded = await asyncio.shield(store.unload(sid, reason="sequence_end"))
            except UnknownStream:
                unloaded = False
        tensors = {k: v.tolist() for k, v in step_tensors(step).items()}  # float32 -> float -> float32 is exact
        return reply(200, {"parameters": step_parameters(sequence_id, step, unloaded), "tensors": tensors})

    async def reset(self, sid: str) -> dict[str, Any]:
        async def op(store: ShardStore, lease: Any) -> dict[str, Any]:
            await store.reset(sid)
            await store.snapshot(sid, reason="reset")  # durable now, never written later outside the lease
            await asyncio.to_thread(lease.commit, last_request=None, last_response=None)
            return reply(200, {"reset": [sid]})

        return await self._with_stream(sid, op)

    async def delete(self, sid: str) -> dict[str, Any]:
        async def op(store: ShardStore, lease: Any) -> dict[str, Any]:
            await store.delete(sid)
            await asyncio.to_thread(lease.commit, last_request=None, last_response=None)
            return reply(204)

        return await self._with_stream(sid, op)

    async def info(self, sid: str) -> dict[str, Any]:
        async def op(store: ShardStore, lease: Any) -> dict[str, Any]:
            return reply(200, {**store.info(sid), "served_by": self.replica_id})

        return await self._with_stream(sid, op)

    async def snapshot(self, sid: str) -> dict[str, Any]:
        async def op(store: ShardStore, lease: Any) -> dict[str, Any]:
            return reply(200, {**(await store.snapshot(sid)), "served_by": self.replica_id})

        return await self._with_stream(sid, op)

    # ------------------------------------------------------------------------------------ replica-wide ops

    async def list_streams(self) -> dict[str, Any]:
        """Streams this replica holds the lease of (live fields) and every snapshot on disk (from its metadata)."""
        store = await self._store()
        owned = {}
        for sid in self.leases.owned():
            rec = self.leases.read(sid)
            if rec.get("owner") == self.replica_id:
                with contextlib.suppress(UnknownStream):
                    owned[sid] = {**store.info(sid), "served_by": self.replica_id}
        return reply(200, {"owned": owned, "on_disk": await asyncio.to_thread(self._disk_listing, store),
                           "stats": store.stats()}, served_by=self.replica_id)

    def _disk_listing(self, store: ShardStore) -> dict[str, dict[str, Any]]:
        """Every snapshot in the shared folder, listed from its header, with its lease holder as ``served_by``."""
        out = {}
        for path in sorted(Path(store.snapshot_dir).glob("*" + SNAPSHOT_SUFFIX)):
            sid = path.name[: -len(SNAPSHOT_SUFFIX)]
            if not valid_stream_id(sid):
                continue
            entry = _Stream(id=sid, on_disk=True)
            store._load_meta_into(entry)
            out[sid] = {**entry.info(), "resident": False, "served_by": self.leases.read(sid).get("owner")}
        return out

    async def metrics_text(self) -> dict[str, Any]:
        if self.store is not None:
            self.store._update_gauges()
        body, _ = self.metrics.render()
        return reply(200, body.decode(), served_by=self.replica_id)

    async def whoami(self) -> dict[str, Any]:
        rt = self.runtime
        return reply(200, {"replica": self.replica_id, "warmup_seconds": self.warmup_seconds, "info": rt.info,
                           "num_classes": rt.num_classes, "time": time.time()}, served_by=self.replica_id)

    async def __del__(self) -> None:  # Serve calls an async __del__ on graceful replica shutdown
        if self.store is not None:
            await self.store.close()
        if self.svc.scheduler is not None:
            await self.svc.scheduler.close()


def _replica_id() -> str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:  # outside a Serve replica (unit tests)
        import uuid

        return "local-" + uuid.uuid4().hex[:8]


def _version() -> str:
    from .. import __version__

    return __version__


__all__ = ["Shard", "ShardStore", "reply", "error"]
