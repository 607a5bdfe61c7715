"""Shared fixtures. Keep additions here additive: several test modules rely on them."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub call takes ~50 s to fail on these machines

import contextlib
import io
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# ------------------------------------------------------------------------------ service: live server


class LiveServer:
    """A real uvicorn server for ``service.app.create_app(settings)`` on a free loopback port, in a thread.

    ``stop()`` is a graceful shutdown (lifespan shutdown runs: streams are snapshotted).
    """

    def __init__(self, settings: Any, ready_timeout: float = 180.0) -> None:
        import uvicorn

        from service.app import create_app
        from service.server import uvicorn_options

        self.settings = settings
        self.app = create_app(settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=60,
                                **uvicorn_options(settings))
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        import httpx

        from mgg_replay.server import wait_ready

        try:
            with httpx.Client() as client:
                wait_ready(client, self.url, timeout, alive=self._thread.is_alive)
        except RuntimeError as exc:
            if "model_load_failed" not in str(exc):
                self.stop()
                raise
            live = httpx.get(self.url + "/healthz", timeout=5).status_code  # still live while never ready
            body = httpx.get(self.url + "/readyz", timeout=5).text
            self.stop()
            raise RuntimeError(f"service failed to load its model (healthz {live}): {body}") from exc
        except BaseException:
            self.stop()
            raise

    def client(self, **kw: Any):
        import httpx

        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 120), **kw)

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._thread.is_alive():
            raise RuntimeError("uvicorn did not shut down in time")


@pytest.fixture
def live_server() -> Iterator[Any]:
    """Factory: ``live_server(settings) -> LiveServer``; every server started is stopped at teardown."""
    servers: list[LiveServer] = []

    def start(settings: Any) -> LiveServer:
        srv = LiveServer(settings)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if srv._thread.is_alive():
            srv.stop()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a shared
    2-core machine more threads make these tiny models tens of times slower. The count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One live server for the whole test module, built from the module's ``settings_for(snapshot_dir)``."""
    srv = LiveServer(request.module.settings_for(tmp_path_factory.mktemp("snapshots")))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[Any]:
    """An ``httpx.Client`` on the module's :func:`server`."""
    with server.client() as c:
        yield c


def service_test_model() -> str:
    """Classifier for service tests: the small bundled BatchNorm ResNet (override with MGG_SERVICE_TEST_MODEL)."""
    return os.environ.get("MGG_SERVICE_TEST_MODEL", "resnet")


def serve_process(snapshot_dir: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    """`mgg serve` in its own process (so that it can be killed with SIGKILL), started and ready: the test model,
    TENT + SGD at lr 0.05, one torch thread, ``extra`` flags; ``MGG_*`` variables of the caller are dropped and
    ``env`` is added."""
    from mgg_replay.server import ServerProcess, serve_command

    flags = ["--model", service_test_model(), "--device", "cpu", "--snapshot-dir", str(snapshot_dir),
             "--log-level", "warning", "--method", "tent", "--optimizer", "sgd", "--lr", "0.05",
             "--torch-threads", "1", *extra]
    full = {k: v for k, v in os.environ.items() if not k.startswith("MGG_")}
    full.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]), **(env or {}))
    return ServerProcess(lambda port: serve_command(port, *flags), full, inherit_env=False,
                         cwd=snapshot_dir.parent).start()


def service_settings(snapshot_dir: Path, **kw: Any) -> Any:
    """``ServiceSettings`` of the loopback service tests (test_service, test_v2, test_faults, ...): the small bundled
    model on the CPU with TENT + SGD, small request limits, one update per request and no source checks (these tests
    count single updates; test_smallbatch* covers the small-batch defaults), no admin token; ``kw`` overrides any of
    it."""
    from service.settings import ServiceSettings

    base: dict[str, Any] = dict(
        model=service_test_model(), method="tent", optimizer="sgd", lr=0.05, device="cpu",
        snapshot_dir=snapshot_dir, max_images=16, max_body_bytes=200_000, admin_token=None,
        max_concurrent_streams=2, idle_seconds=600, log_level="warning",
        update_images=1, bn_stats="batch", guard_check_share=0.0,
    )
    base.update(kw)
    return ServiceSettings(_env_file=None, **base)


def metric(c: Any, name: str, **labels: str) -> float:
    """The sum of the ``/metrics`` samples named ``name`` whose labels include ``labels`` (0.0 when none), read
    through ``c`` (an httpx client of a live server) with prometheus_client's own text parser."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(c.get("/metrics").text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def posting_threads(srv: Any, body: bytes, headers: dict[str, str], stream_ids: list[str]
                    ) -> tuple[list[threading.Thread], dict[str, Any]]:
    """One unstarted thread per stream id that POSTs ``body`` to ``srv``'s /predict with ``headers`` and that
    ``X-Stream-Id``, each on its own client; the dict receives each stream's response once its thread is done."""
    results: dict[str, Any] = {}

    def send(sid: str) -> None:
        with srv.client() as c:
            results[sid] = c.post("/predict", content=body, headers={**headers, "X-Stream-Id": sid})

    return [threading.Thread(target=send, args=(sid,)) for sid in stream_ids], results


def wait_for(cond: Any, timeout: float = 30.0) -> None:
    """Poll ``cond()`` every 20 ms until it is true; TimeoutError after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise TimeoutError("condition not reached")


@contextlib.contextmanager
def gated_engine(srv: Any, timeout: float = 60.0) -> Iterator[threading.Event]:
    """Hold every engine call of the live server ``srv`` at a gate until the yielded event is set: the single step
    and the fused one (fused steps, the default, may not go through ``engine.step``). On exit the gate opens and
    the engine's own methods are back."""
    engine = srv.app.state.svc.runtime.engine
    gate = threading.Event()
    real_step, real_many = engine.step, engine.step_many

    def gated(real: Any) -> Any:
        def call(*a: Any, **kw: Any) -> Any:
            assert gate.wait(timeout), "the test never opened the engine gate"
            return real(*a, **kw)
        return call

    engine.step, engine.step_many = gated(real_step), gated(real_many)
    try:
        yield gate
    finally:
        gate.set()
        engine.step, engine.step_many = real_step, real_many


# ----------------------------------------------------------------------------------- image helpers


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="session")
def digit_images() -> np.ndarray:
    """32 real MNIST-5k test digits, uint8 (32, 28, 28); random noise if the embedded set is unavailable."""
    try:
        from mgg_core.data.sources import mnist5k

        src = mnist5k("test")
        idx = np.linspace(0, len(src) - 1, 32).astype(int)
        return np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8)
    except Exception:  # noqa: BLE001
        return np.random.default_rng(0).integers(0, 256, size=(32, 28, 28), dtype=np.uint8)


@pytest.fixture
def tmp_snapshots(tmp_path: Path) -> Path:
    d = tmp_path / "snapshots"
    d.mkdir()
    return d


# ------------------------------------------------------------------------------ a small carded classifier


def write_random_classifier(folder: Path, model_name: str = "test_resnet", seed: int = 0) -> Path:
    """A randomly initialised timm classifier saved with a card (MNIST-5k-like), as a bundled one would be."""
    import timm
    import torch
    from safetensors.torch import save_file

    from mgg_core.classifier import ClassifierCard

    torch.manual_seed(seed)
    model = timm.create_model(model_name, num_classes=10)
    path = Path(folder) / "clf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    ClassifierCard(model_name=model_name, num_classes=10, class_names=[str(i) for i in range(10)],
                   input_size=[3, 32, 32], mean=[0.13] * 3, std=[0.29] * 3, dataset={"kind": "mnist5k"}).save(
        path.with_suffix(".json"))
    return path
