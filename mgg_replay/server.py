"""Start the service in a subprocess and wait until it is ready: the one helper for the load client, the tests and
``scripts/bench_service.py``.

- :func:`free_port`: a free TCP port on ``host`` (bound and released; another process could take it in between,
  which on loopback in tests has not been seen to matter);
- :func:`wait_ready`: poll ``GET /readyz`` until 200; fail at once when the process exits or the server reports
  ``model_load_failed`` (it will never become ready), else after ``timeout``;
- :class:`ServerProcess`: any server command line in a subprocess, output to a log file, to a list of lines
  (``capture=True``) or discarded; ``terminate()`` is a graceful SIGTERM stop (streams are snapshotted),
  ``kill()`` a hard one. A context manager: ``with ServerProcess(...) as s: s.url``;
- :func:`kill9_restart`: the crash scenario of the fault tests and ``scripts/bench_faults.py``: drive a server,
  ``kill -9`` it, start another on the same snapshots and look at what survived;
- :class:`LocalServer`: the service as ``uvicorn --factory service.app:create_app`` with settings from ``MGG_*``
  environment variables; :func:`serve_command`: the ``mgg serve`` command line (as deployed).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

SERVER_COMMAND = ("-m", "uvicorn", "--factory", "service.app:create_app")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_ready(client: Any, url: str, timeout: float, process: subprocess.Popen | None = None,
               alive: Callable[[], bool] | None = None, path: str = "/readyz") -> None:
    """Return once ``url + path`` answers 200.

    Args:
        client: an ``httpx.Client`` (or anything with ``get(url, timeout=)``).
        url: the server's base URL.
        timeout: seconds to wait in all.
        process: the server's process, if this side started it: its exit fails the wait at once.
        alive: another liveness check (e.g. an in-process server thread): False fails the wait at once.
        path: the readiness endpoint (``/readyz`` of the service; e.g. ``/-/ready`` for Prometheus).

    Raises:
        RuntimeError: the process exited, ``alive()`` turned False, or the model cannot be loaded.
        TimeoutError: not ready after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before it was ready")
        if alive is not None and not alive():
            raise RuntimeError("the server stopped before it was ready")
        try:
            r = client.get(url + path, timeout=5)
            if r.status_code == 200:
                return
            last = f"{path} answered {r.status_code}: {r.text[:200]}"
            if "model_load_failed" in r.text:  # it will never become ready
                raise RuntimeError(f"{url} cannot load its model: {r.text[:400]}")
        except Exception as exc:
            if isinstance(exc, RuntimeError):
                raise
            last = f"{type(exc).__name__}"
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s ({last})")


def serve_command(port: int, *flags: str, host: str = "127.0.0.1") -> list[str]:
    """``python -m mgg_core.cli serve --host H --port P FLAGS...``: the service as ``mgg serve`` runs it."""
    return [sys.executable, "-m", "mgg_core.cli", "serve", "--host", host, "--port", str(port), *flags]


class ServerProcess:
    """A server subprocess on a free local port, waited on until ``/readyz`` answers 200.

    Args:
        command: the command line, or a function of the port that returns it (e.g. ``lambda p: serve_command(p)``).
        env: environment variables added to (or, with ``inherit_env=False``, instead of) this process's.
        host: the address the server binds and the URL uses.
        port: the port (default: a free one).
        ready_timeout: seconds :meth:`start` waits for readiness.
        log_path: a file for the server's stdout and stderr; default: discarded, or kept in :attr:`lines` with
            ``capture=True``.
        capture: keep the server's output lines in :attr:`lines` (read by a thread) instead of a file.
        cwd: the server's working directory.
        inherit_env: start from ``os.environ`` (default) or from ``env`` alone.
        ready_path: the readiness endpoint polled by :func:`wait_ready`.
    """

    def __init__(self, command: Sequence[str] | Callable[[int], Sequence[str]], env: Mapping[str, str] | None = None,
                 host: str = "127.0.0.1", port: int | None = None, ready_timeout: float = 180.0,
                 log_path: str | os.PathLike | None = None, capture: bool = False,
                 cwd: str | os.PathLike | None = None, inherit_env: bool = True, ready_path: str = "/readyz") -> None:
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.command = list(command(self.port) if callable(command) else command)
        self.env = {**(os.environ if inherit_env else {}), **(env or {})}
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.ready_timeout = ready_timeout
        self.log_path = Path(log_path) if log_path else None
        self.capture = capture
        self.cwd = cwd
        self.ready_path = ready_path
        self.process: subprocess.Popen | None = None
        self.lines: list[str] = []
        self._log: IO[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self) -> ServerProcess:
        """Start the process and wait until it is ready; on failure the process is stopped and the error raised
        (with the captured output when ``capture``)."""
        import httpx

        if self.capture:
            out: Any = subprocess.PIPE
        else:
            self._log = open(self.log_path, "wb") if self.log_path else None  # noqa: SIM115 - closed in stop()
            out = self._log or subprocess.DEVNULL
        self.process = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=out,
                                        stderr=subprocess.STDOUT, text=self.capture)
        if self.capture:
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        try:
            with httpx.Client() as client:
                wait_ready(client, self.url, self.ready_timeout, self.process, path=self.ready_path)
        except BaseException as exc:
            self.kill()
            if self.capture and isinstance(exc, (RuntimeError, TimeoutError)):
                raise type(exc)(f"{exc}; server output:\n{self.output}") from exc
            raise
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 90.0) -> int:
        """SIGTERM (a graceful shutdown: streams are snapshotted) and wait; returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._close()

    def kill(self) -> None:
        """SIGKILL when still running (no shutdown work happens)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close()

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        if self.process is not None and self.process.poll() is None:
            try:
                self.terminate(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.join(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalServer(ServerProcess):
    """The service (``uvicorn --factory service.app:create_app``, settings from ``MGG_*`` environment variables)
    in a subprocess on a free local port; a context manager that waits for /readyz and stops the process on exit.

    Args:
        env: ``MGG_*`` settings (added to this process's environment).
        host, port, ready_timeout, log_path: as :class:`ServerProcess`.
    """

    def __init__(self, env: Mapping[str, str], host: str = "127.0.0.1", port: int | None = None,
                 ready_timeout: float = 180.0, log_path: str | os.PathLike | None = None) -> None:
        def command(p: int) -> list[str]:
            return [sys.executable, *SERVER_COMMAND, "--host", host, "--port", str(p), "--log-level", "warning",
                    "--no-access-log"]

        super().__init__(command, env, host=host, port=port, ready_timeout=ready_timeout, log_path=log_path)
        self.env.update(MGG_HOST=host, MGG_PORT=str(self.port))

    def __enter__(self) -> LocalServer:
        self.start()
        return self


def kill9_restart(start: Callable[[], ServerProcess], before: Callable[[Any], T], after: Callable[[Any, T], R],
                  timeout: float = 120.0) -> R:
    """The kill -9 scenario: a server driven by ``before``, killed with SIGKILL (no shutdown work runs), then a
    second one on the same snapshots, asked by ``after``.

    Args:
        start: starts a server (a started :class:`ServerProcess`) on the snapshot folder under test; called twice.
        before: ``before(client) -> acknowledged``: the traffic before the crash (an ``httpx.Client`` on the first
            server); returns what the server acknowledged.
        after: ``after(client, acknowledged) -> result``: the checks after the restart, on the second server.
        timeout: the clients' request timeout in seconds.

    Returns:
        ``after``'s result; the second server is stopped gracefully (SIGTERM) whatever happens.
    """
    import httpx

    first = start()
    try:
        with httpx.Client(base_url=first.url, timeout=timeout) as c:
            acknowledged = before(c)
    finally:
        first.kill()
    second = start()
    try:
        with httpx.Client(base_url=second.url, timeout=timeout) as c:
            return after(c, acknowledged)
    finally:
        second.stop(60.0)


__all__ = ["SERVER_COMMAND", "LocalServer", "ServerProcess", "free_port", "kill9_restart", "serve_command",
           "wait_ready"]
