"""Progress for long jobs: short lines on stderr, never one endless log line.

Contract: :func:`progress_bar` returns a tqdm bar on an interactive terminal (stderr is a TTY) and otherwise a
:class:`LineProgress` that prints a complete line (``desc: k/N (p%) postfix``) at most every ``interval`` seconds
and once at the end, so a redirected log gets a few short lines instead of tqdm's carriage-return updates glued
into one line of thousands of characters. ``enabled=False`` prints nothing. :func:`log_line` writes one finished
step (a domain, a method) to stderr without breaking a live bar; jobs call it whatever ``--no-progress`` says.
"""
from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["LineProgress", "log_line", "progress_bar"]


class LineProgress:
    """The non-interactive bar: the same small interface as tqdm (update, set_postfix, write, close)."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, interval: float = 15.0, stream=None):
        self.total, self.desc, self.enabled, self.interval = total, desc, enabled, interval
        self.n = 0
        self.postfix = ""
        self.stream = stream if stream is not None else sys.stderr
        self._last = time.monotonic()
        self._printed_at = -1

    def _line(self) -> str:
        if self.total:
            head = f"{self.desc}: {self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)"
        else:
            head = f"{self.desc}: {self.n}"
        return head + (f" {self.postfix}" if self.postfix else "")

    def _emit(self) -> None:
        if self.enabled and self._printed_at != self.n:
            print(self._line()[:200], file=self.stream, flush=True)
            self._printed_at = self.n
            self._last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._emit()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kw.items())

    def write(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        if self.n:
            self._emit()


def progress_bar(total: int | None, desc: str, enabled: bool = True, leave: bool = True):
    """tqdm on a terminal, :class:`LineProgress` otherwise (see the module docstring)."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)
    return LineProgress(total, desc, enabled=enabled)


def log_line(msg: str, quiet: bool = False) -> None:
    """One finished step on stderr (through tqdm.write so a live bar on a terminal is redrawn below it)."""
    if quiet:
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)
