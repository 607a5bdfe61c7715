"""`mgg serve` as a real process: settings precedence, docs URL, SIGTERM snapshots, restart restores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import npy_bytes, service_test_model

from mgg_replay.server import ServerProcess, serve_command

REPO = Path(__file__).resolve().parents[1]
NPY = {"Content-Type": "application/x-npy"}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGG_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)
    return env


def mgg(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgg_core.cli", *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=120)


def test_settings_precedence_flags_env_dotenv_config(tmp_path):
    (tmp_path / "conf.yaml").write_text("port: 9100\nmethod: tent\nmax_images: 7\nstate_budget_bytes: 1234\n")
    (tmp_path / ".env").write_text("MGG_MAX_IMAGES=9\nMGG_METHOD=eata\n")
    env = clean_env(MGG_METHOD="sar", MGG_ADMIN_TOKEN="hunter2")
    r = mgg("serve", "--print-settings", "--config", "conf.yaml", "--port", "9200", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["port"] == 9200  # flag beats config file
    assert s["method"] == "sar"  # env var beats .env and config file
    assert s["max_images"] == 9  # .env beats config file
    assert s["state_budget_bytes"] == 1234  # config file beats default
    assert s["optimizer"] is None and s["host"] == "127.0.0.1"  # defaults (None: the method's own)
    assert s["admin_token"] == "**********" and "hunter2" not in r.stdout  # never printed
    r = mgg("serve", "--print-settings", "--port", "70000", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "port" in r.stderr
    (tmp_path / "bad.yaml").write_text("no_such_setting: 1\n")
    r = mgg("serve", "--config", "bad.yaml", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "no_such_setting" in r.stderr


def serve_process(cwd: Path, snapshot_dir: Path, *extra: str) -> ServerProcess:
    """`mgg serve` in a subprocess (output kept in ``.lines``), started and ready; one update per request and no
    source checks (these tests count steps per request; test_smallbatch covers the small-batch defaults)."""
    flags = ["--model", service_test_model(), "--device", "cpu", "--snapshot-dir", str(snapshot_dir),
             "--log-level", "warning", *extra]
    env = clean_env(MGG_UPDATE_IMAGES="1", MGG_BN_STATS="batch", MGG_GUARD_CHECK_SHARE="0")
    return ServerProcess(lambda port: serve_command(port, *flags), env, capture=True, cwd=cwd,
                         inherit_env=False).start()


def _predict(c: httpx.Client, sid: str, x: np.ndarray) -> dict:
    r = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": sid})
    assert r.status_code == 200, r.text
    return r.json()


def _scores(resp: dict) -> list:
    return [[p["label"], p["score"], p["entropy"], *[t["score"] for t in p["topk"]]] for p in resp["predictions"]]


@pytest.mark.timeout(400)
def test_restart_finds_the_stream_at_the_same_step_with_the_same_predictions(tmp_path, digit_images):
    snaps = tmp_path / "snaps"
    x, probe = digit_images[:8], digit_images[8:16]
    args = ("--method", "tent", "--optimizer", "sgd", "--lr", "0.05")
    first = serve_process(tmp_path, snaps, *args)
    try:
        out = "".join(first.lines)
        assert f"{first.url}/docs" in out  # it says where the docs are
        with httpx.Client(base_url=first.url, timeout=60) as c:
            for _ in range(3):
                _predict(c, "keep", x)
                _predict(c, "ref", x)
            expected = _predict(c, "ref", probe)  # what "keep" must answer next, after its 3 updates
            source = _predict(c, "fresh", probe)
            assert _scores(expected) != _scores(source)
            assert c.get("/streams/keep").json()["snapshot"] is True  # durability=step: on disk before each answer
        # graceful shutdown on SIGTERM (uvicorn re-raises the signal once shut down: -15 is a clean exit too)
        assert first.terminate() in (0, -signal.SIGTERM)
    finally:
        first.kill()
    assert (snaps / "keep.safetensors").is_file()
    assert not list(snaps.glob(".*.tmp"))  # no half-written snapshot left behind

    second = serve_process(tmp_path, snaps, *args)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as c:
            info = c.get("/streams/keep").json()
            assert (info["step"], info["resident"], info["snapshot"]) == (3, False, True)
            got = _predict(c, "keep", probe)
            assert got["step"] == 4
            assert _scores(got) == _scores(expected)
            metrics = c.get("/metrics").text
            assert "tta_snapshot_restores_total 1.0" in metrics
        assert second.terminate() in (0, -signal.SIGTERM)
    finally:
        second.kill()


def test_serve_help_names_values_after_their_settings(tmp_path):
    r = mgg("serve", "--help", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "--host HOST" in r.stdout and "--snapshot-dir SNAPSHOT_DIR" in r.stdout
    assert "OPT_" not in r.stdout


def test_readme_sample_images_exist_and_are_the_digits_they_are_named_after():
    from PIL import Image

    from mgg_core.data.sources import mnist5k

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    source = mnist5k("test")
    for name in ("digit0.png", "digit1.png"):
        assert f"docs/samples/{name}" in readme
        image = np.asarray(Image.open(REPO / "docs" / "samples" / name))
        digit = int(name[5])
        first = source.images[int((source.labels == digit).nonzero()[0][0])]
        assert image.dtype == np.uint8 and np.array_equal(image, first)
