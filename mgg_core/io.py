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
already replaced. The fsyncs run back to back in one thread, so the filesystem's journal commits batch them.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
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
    before it (complete new files, their folder fsynced), ``error`` is the rename's own error."""

    def __init__(self, replaced: list[Path], error: OSError) -> None:
        super().__init__(error.errno, f"group write stopped after {len(replaced)} file(s): {error.strerror}")
        self.replaced = replaced
        self.error = error


def atomic_write_group(files: Sequence[tuple[str | os.PathLike[str], bytes, bool]]) -> None:
    """Write many files, each atomically, with one pass of fsyncs and one fsync per folder (see the module contract).

    Args:
        files: ``(path, data, durable)`` in rename order; ``durable=False`` files are renamed but not fsynced
            themselves (their folder is, when any file of the group is durable).
    """
    pending: list[tuple[Path, Path, bool]] = []  # (tmp, destination, durable)
    open_fds: list[int] = []
    try:
        folders: set[Path] = set()
        for path, data, durable in files:
            dest = Path(path)
            if dest.parent not in folders:  # once per folder: each call is two system calls (mkdir, stat)
                dest.parent.mkdir(parents=True, exist_ok=True)
                folders.add(dest.parent)
            fd, name = tempfile.mkstemp(dir=str(dest.parent), prefix=f".{dest.name}.", suffix=".tmp")
            open_fds.append(fd)
            pending.append((Path(name), dest, durable))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        while open_fds:
            if pending[len(pending) - len(open_fds)][2]:
                os.fsync(open_fds[0])
            os.close(open_fds.pop(0))
    except BaseException:
        for fd in open_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for tmp, _dest, _durable in pending:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise
    replaced: list[Path] = []
    try:
        for tmp, dest, _durable in pending:
            os.replace(tmp, dest)
            replaced.append(dest)
    except OSError as exc:
        for tmp, _dest, _durable in pending[len(replaced):]:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_folders(pending[: len(replaced)])
        raise GroupWriteError(replaced, exc) from exc
    _fsync_folders(pending)


def _fsync_folders(done: Sequence[tuple[Path, Path, bool]]) -> None:
    if any(durable for _tmp, _dest, durable in done):
        for folder in dict.fromkeys(dest.parent for _tmp, dest, _durable in done):
            fsync_dir(folder)
