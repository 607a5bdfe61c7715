"""Atomic file writes: the one helper every writer in the project uses.

Contract: a reader either sees the old file or the complete new one, never a torn one. The data goes to a
temporary file in the destination's own folder (same filesystem, so the rename is atomic), is flushed and, with
``durable=True`` (the default), fsynced; it is then renamed over the destination and the folder is fsynced so the
rename itself survives a power loss or ``kill -9``. On any error the temporary file is removed and the destination
is left as it was.

Why our own: the standard library has no atomic replace-with-fsync, and the small packages that do (atomicwrites)
are unmaintained; this is twenty lines.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "fsync_dir", "fsync_file"]


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
