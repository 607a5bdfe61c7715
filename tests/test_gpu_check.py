"""scripts/gpu_check.py: skips cleanly without CUDA, and runs its tests and benchmark on ``--device cpu``.

The CPU run is the script's ``--quick`` CPU profile (batch 8, 4 streams x 2 vs 2 x 8, 32 px) on the bundled
resnet only, with the smoke selection of the cuda tests: the 224 px timm models take minutes on these CPUs (run
``scripts/gpu_check.py --device cpu --quick`` by hand to include them).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod    # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the skip path does not apply")
def test_without_cuda_it_says_skipped_and_exits_0(tmp_path):
    out = tmp_path / "out"
    proc = _run("--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_check: no CUDA device: skipped" in proc.stdout
    assert not out.exists()   # nothing ran, nothing written


def test_bad_sizes_are_usage_errors():
    proc = _run("--device", "cpu", "--batch", "0", timeout=60)
    assert proc.returncode == 2 and "--batch must be >= 1" in proc.stderr


def test_ratios_are_computed_from_the_rows():
    m = _module()
    sizes = {"batch": 64, "streams": 16, "stream_images": 4, "big_streams": 2}
    rows = [m.Row("r", "noadapt", "step", "1x64", img_per_s=1000.0), m.Row("r", "eata", "step", "1x64", 250.0),
            m.Row("r", "foa+mgg", "step", "1x64", error="boom"), m.Row("r", "eata", "step_many", "16x4", 150.0),
            m.Row("r", "eata", "step_many", "2x64", 200.0)]
    got = {(r["model"], r["ratio"]): r["value"] for r in m.ratios(rows, sizes)}
    assert got == {("r", "eata / noadapt"): 0.25, ("r", "16x4 / 2x64 (eata)"): 0.75}


def test_cpu_quick_run_tests_benchmark_and_report(tmp_path):
    out = tmp_path / "out"
    proc = _run("--device", "cpu", "--quick", "--tests", "smoke", "--models", "resnet", "--threads", "1",
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    p = report["protocol"]
    assert p["device"] == "cpu" and p["torch"] == torch.__version__ and p["torch_threads"] == 1
    assert (p["batch"], p["streams"], p["stream_images"], p["big_streams"], p["update_images"]) == (8, 4, 2, 2, 8)
    # part 1: the smoke selection of the cuda tests ran on the CPU and passed
    assert report["tests"]["rc"] == 0 and "passed" in report["tests"]["summary"]
    assert "failed" not in report["tests"]["summary"] and (out / "pytest.log").is_file()
    # part 2: every mode measured, each adapting mode really updated (update_images = batch: every step)
    rows = {(r["model"], r["mode"], r["call"], r["layout"]): r for r in report["rows"]}
    assert set(rows) == {("resnet", m, "step", "1x8") for m in ("noadapt", "tent+sgd", "eata", "foa+mgg")} | {
        ("resnet", "eata", "step_many", "4x2"), ("resnet", "eata", "step_many", "2x8")}
    assert all(r["error"] is None and r["img_per_s"] > 0 and "warning" not in r["extra"] for r in rows.values())
    assert rows[("resnet", "noadapt", "step", "1x8")]["extra"]["updates"] == 0
    assert rows[("resnet", "tent+sgd", "step", "1x8")]["extra"]["updates"] == 3     # 1 warm-up + 2 timed steps
    assert rows[("resnet", "foa+mgg", "step", "1x8")]["extra"]["updates"] == 3
    ratio = {r["ratio"]: r["value"] for r in report["ratios"]}
    assert set(ratio) == {"tent+sgd / noadapt", "eata / noadapt", "foa+mgg / noadapt", "4x2 / 2x8 (eata)"}
    base = rows[("resnet", "noadapt", "step", "1x8")]["img_per_s"]
    assert ratio["tent+sgd / noadapt"] == pytest.approx(rows[("resnet", "tent+sgd", "step", "1x8")]["img_per_s"]
                                                        / base, abs=1e-3)
    md = (out / "gpu_check.md").read_text()
    assert "| resnet | eata | step_many | 4x2 |" in md and "| resnet | 4x2 / 2x8 (eata) |" in md
    assert md in proc.stdout   # the tables are printed too
