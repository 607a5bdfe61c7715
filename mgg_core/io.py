"""Atomic file writes: the one helper every writer in the project uses.

Contract: a reader either sees the old file or the complete new one, never a torn one. The data goes to a
temporary file in the destination's own folder (same filesystem, so the rename is atomic), is flushed and, with
``durable=True`` (the default), fsynced; it is then renamed over the destination and the folder is fsynced so the
rename itself survives a power loss or ``kill -9``. On any error the temporary file is removed and the destination
is left as it was.

Why our own: the standard library has no atomic replace-with-fsync, and the small packages that do (atomicwrites)
are unmaintained; this is twenty lines.

Group writes (:func:`atomic_write_group`, a group commit's one durable write for many files): every file is
atomic on its own as above, and the work is ordered so that a failure touches no destination at all whenever it
can: phase 1 writes (and, where durable, fsyncs) every temporary file; only then does phase 2 rename them, in the
given order, and fsync each folder once. An error in phase 1 leaves every destination as it was; an error in
phase 2 (a rename failing: in practice only an I/O error) raises :class:`GroupWriteError` naming the destinations
already replaced. Phase 1 may run on an executor, every file at once: a file's data may be a function (its
serialiser), run there, so that serialising one file overlaps another's fsync, and concurrent fsyncs share the
filesystem journal's commits (16 snapshots of 39 KB: 4.1-4.5 ms one after the other, 2.5-2.8 ms on 8 threads).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from pathlib import Path

__all__ = [
    "GroupWriteError", "atomic_path", "atomic_write_bytes", "atomic_write_group", "atomic_write_text", "fsync_dir",
    "fsync_file",
]


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a folder's entries (renames, creations) to stable storage; a no-op where unsupported."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on normal exit it replaces ``path`` atomically.

    Use it for writers that want a file name (``safetensors.save_file``, ``PIL.Image.save``, ``np.save``)::

        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _write_with(path: str | os.PathLike[str], write: Callable[[Path], object], durable: bool) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically (see the module contract)."""
    return _write_with(path, lambda tmp: tmp.write_bytes(data), durable)


def atomic_write_text(path: str | os.PathLike[str], text: str, durable: bool = True,
                      encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see the module contract)."""
    return _write_with(path, lambda tmp: tmp.write_text(text, encoding=encoding), durable)


class GroupWriteError(OSError):
    """A rename of :func:`atomic_write_group`'s phase 2 failed; ``replaced`` lists the destinations replaced
    before it (complete new files, their folder fsynced), ``error`` is the rename's own error, ``sizes`` the bytes of
    every file of the group (in the given order)."""

    def __init__(self, replaced: list[Path], error: OSError, sizes: list[int] | None = None) -> None:
        super().__init__(error.errno, f"group write stopped after {len(replaced)} file(s): {error.strerror}")
        self.replaced = replaced
        self.error = error
        self.sizes = list(sizes or [])


def atomic_write_group(
    files: Sequence[tuple[str | os.PathLike[str], bytes | Callable[[], bytes], bool]],
    *,
    executor: Executor | None = None,
    before_replace: Callable[[list[int]], None] | None = None,
) -> list[int]:
    """Write many files, each atomically, with one fsync per folder (see the module contract); returns each file's
    size in bytes.

    Args:
        files: ``(path, data, durable)`` in rename order; ``data`` is the bytes or a function producing them (run in
            phase 1, e.g. a serialiser); ``durable=False`` files are renamed but not fsynced themselves (their
            folder is, when any file of the group is durable).
        executor: where phase 1 runs, one task per file, concurrently (None: here, file after file). An fsync
            releases the GIL and the filesystem's journal can carry concurrent fsyncs in one commit, so one file's
            fsync overlaps the next one's serialisation and the fsyncs share commits.
        before_replace: called with the sizes after phase 1 and before any rename; whatever it raises abandons the
            group with no destination touched (every temporary file removed).
    """
    dests = [Path(path) for path, _data, _durable in files]
    for folder in dict.fromkeys(d.parent for d in dests):  # once per folder: two system calls (mkdir, stat)
        folder.mkdir(parents=True, exist_ok=True)
    temps: list[Path | None] = [None] * len(files)
    sizes = [0] * len(files)

    def write_one(i: int) -> None:
        _path, data, durable = files[i]
        payload = data() if callable(data) else data
        fd, name = tempfile.mkstemp(dir=str(dests[i].parent), prefix=f".{dests[i].name}.", suffix=".tmp")
        temps[i] = Path(name)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        sizes[i] = len(payload)

    try:
        if executor is None:
            for i in range(len(files)):
                write_one(i)
        else:  # every task finishes (none is left writing) before an error is raised
            futures = [executor.submit(write_one, i) for i in range(len(files))]
            errors = [f.exception() for f in futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                raise first
        if before_replace is not None:
            before_replace(list(sizes))
    except BaseException:
        for tmp in temps:
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        raise
    pending = [(tmp, dest, durable) for tmp, dest, (_p, _d, durable) in zip(temps, dests, files, strict=True)]
    replaced: list[Path] = []
    try:
        for tmp, dest, _durable in pending:
            assert tmp is not None
            os.replace(tmp, dest)
            replaced.append(dest)
    except OSError as exc:
        for tmp, _dest, _durable in pending[len(replaced):]:
            with contextlib.suppress(FileNotFoundError):
                assert tmp is not None
                tmp.unlink()
        _fsync_folders(pending[: len(replaced)])
        raise GroupWriteError(replaced, exc, sizes) from exc
    _fsync_folders(pending)
    return sizes


def _fsync_folders(done: Sequence[tuple[Path | None, Path, bool]]) -> None:
    if any(durable for _tmp, _dest, durable in done):
        for folder in dict.fromkeys(dest.parent for _tmp, dest, _durable in done):
            fsync_dir(folder)
