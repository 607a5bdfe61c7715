"""Stream leases with fencing on the shared snapshot directory: two replicas never both advance a stream.

Contract. Every operation a replica performs on a stream (predict, reset, delete, info, snapshot) runs inside
``LeaseTable.hold(stream_id)``, which takes an exclusive POSIX lock (``fcntl.flock``) on
``<snapshot_dir>/.leases/<stream_id>.lease`` for the whole operation, including the snapshot write that makes a
step durable. The file holds ``{"owner": replica id, "epoch": n, ...}``. On entry the holder compares the record
with the epoch it remembers for the stream:

* same owner and epoch: nobody else touched the stream since our last operation; our resident state is current;
* anything else (first time, or another replica advanced the stream meanwhile): the epoch is bumped, we become
  the owner and ``Lease.fresh`` is True; the caller must then drop any resident copy and restore the stream from
  its snapshot (the fencing rule: a stale copy is never advanced).

Because the lock is held across step + snapshot and ownership changes bump the epoch, a replica that lost a
stream (router remapped it after a scale event or a crash) and gets it back later re-reads the snapshot instead of
advancing its stale copy. A dead process's flock is released by the kernel, so a killed replica never blocks its
streams. The record also carries the id and response of the last request applied to the stream, so the ingress
can retry a request whose replica died after making it durable without applying it twice.

Needs a filesystem with working ``flock`` shared by all replicas (local disk for one node; NFSv4, CephFS,
EFS/Filestore for several nodes). Object stores have no locks and are not supported for leases.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEASE_DIRNAME = ".leases"
LEASE_SUFFIX = ".lease"


class LeaseTimeout(TimeoutError):
    """The stream's lease could not be taken within the time limit (another replica holds it)."""


@dataclass
class Lease:
    stream_id: str
    owner: str
    epoch: int
    fresh: bool  # ownership changed on entry: drop any resident copy, restore from the snapshot
    record: dict[str, Any] = field(default_factory=dict)
    _fd: int = -1
    wait_s: float = 0.0  # time spent taking the lease

    def commit(self, **extra: Any) -> None:
        """Write ``extra`` (e.g. the last applied request) into the lease record while still held.

        Not fsynced: it must survive the death of the replica process (the page cache does), not of the machine;
        the step itself is durable through its fsynced snapshot.
        """
        self.record.update(extra)
        _write_record(self._fd, self.record, sync=False)


def _read_record(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        b = os.read(fd, 65536)
        if not b:
            break
        chunks.append(b)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(fd: int, record: dict[str, Any], sync: bool = True) -> None:
    data = json.dumps(record, separators=(",", ":")).encode()
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, data)
    if sync:
        os.fsync(fd)


class LeaseTable:
    """One replica's view of the stream leases in ``<snapshot_dir>/.leases``.

    Args:
        snapshot_dir: the snapshot folder every replica shares.
        owner: this replica's id (written into the records it owns).
        timeout_s: how long ``hold`` waits for another replica's lock before raising :class:`LeaseTimeout`.
    """

    def __init__(self, snapshot_dir: str | os.PathLike[str], owner: str, timeout_s: float = 30.0) -> None:
        self.dir = Path(snapshot_dir) / LEASE_DIRNAME
        self.owner = owner
        self.timeout_s = float(timeout_s)
        self._epochs: dict[str, int] = {}  # stream -> epoch at which this replica last held it

    def path(self, stream_id: str) -> Path:
        return self.dir / f"{stream_id}{LEASE_SUFFIX}"

    def _acquire(self, stream_id: str) -> Lease:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path(stream_id), os.O_RDWR | os.O_CREAT, 0o644)
        t0 = time.monotonic()
        deadline = t0 + self.timeout_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LeaseTimeout(f"stream {stream_id!r} is held by another replica") from None
                    time.sleep(0.005)
            record = _read_record(fd)
            epoch = int(record.get("epoch") or 0)
            fresh = record.get("owner") != self.owner or self._epochs.get(stream_id) != epoch
            if fresh:
                epoch += 1
                record = {"owner": self.owner, "epoch": epoch, "since": time.time()}
                _write_record(fd, record)
                self._epochs[stream_id] = epoch
            return Lease(stream_id, self.owner, epoch, fresh, record, fd, time.monotonic() - t0)
        except BaseException:
            os.close(fd)  # closing releases the lock
            raise

    @staticmethod
    def _release(lease: Lease) -> None:
        with contextlib.suppress(OSError):
            fcntl.flock(lease._fd, fcntl.LOCK_UN)
        os.close(lease._fd)

    @contextlib.asynccontextmanager
    async def hold(self, stream_id: str) -> AsyncIterator[Lease]:
        """Hold the stream's lease for the duration of the block (the lock is taken in a worker thread)."""
        lease = await asyncio.to_thread(self._acquire, stream_id)
        try:
            yield lease
        finally:
            await asyncio.to_thread(self._release, lease)

    def owned(self) -> list[str]:
        """Streams this replica took a lease on (it may have lost some since; ``hold`` finds out)."""
        return sorted(self._epochs)

    def holds(self, stream_id: str) -> bool:
        """Whether this replica is still the stream's owner at the epoch it last held (a read, no lock)."""
        rec = self.read(stream_id)
        return rec.get("owner") == self.owner and rec.get("epoch") == self._epochs.get(stream_id)

    def read(self, stream_id: str) -> dict[str, Any]:
        """The stream's lease record without locking (for listings)."""
        try:
            data = json.loads(self.path(stream_id).read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}


__all__ = ["Lease", "LeaseTable", "LeaseTimeout", "LEASE_DIRNAME"]
