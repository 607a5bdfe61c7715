#!/usr/bin/env python
"""The GPU check (issue 10): the CUDA tests and a throughput benchmark on one device, in one command.

    bash scripts/gpu_check.sh [--quick] [--out DIR]          # on a GPU machine (picks a Python, see the .sh)
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/gpu_check.py --device cpu --quick --out /tmp/gc   # exercise it here

Contract:
- ``--device cuda`` (the default) on a machine without CUDA prints ``gpu_check: no CUDA device: skipped`` and
  exits 0 (nothing else runs). Any other device, ``cpu`` included, runs the same checks there.
- Part 1, tests: ``pytest -m cuda`` over ``tests/`` with ``MGG_TEST_DEVICE=<device>`` (the device under test; the
  reference is the CPU). ``--tests smoke`` runs one case of each test, ``none`` skips them.
- Part 2, benchmark: for each model, engines built as the service builds them (``service.runtime.load_runtime``
  for the bundled ``resnet``/``vit``, ``service.runtime.engine_config`` over timm's ``vit_base_patch16_224`` and
  ``resnet50`` with random weights, ``pretrained=False``), all from ``ServiceSettings(device=...)`` defaults plus
  the mode's method/optimizer. Per model: img/s of ``engine.step`` at ``--batch`` images for no adaptation and
  each adapting mode (``MODES``), and the multi-stream step ``engine.step_many`` with ``--streams`` streams of
  ``--stream-images`` images against ``--big-streams`` streams of ``--batch`` images (the same images in total).
  Ratios: adapt / noadapt, and small-streams / big-streams.
- Writes ``gpu_check.json`` (protocol, tests, rows, ratios) and ``gpu_check.md`` (the tables) under ``--out`` and
  prints the markdown. Exit code: 0 when the tests passed (or were skipped) and the benchmark ran, 1 when a test
  failed or a benchmark case raised, 2 on bad arguments.
- ``--time-budget`` bounds the whole run: models not started by then are recorded as not run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # random weights only: nothing may download

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: benchmark modes: the service settings each one overrides (the rest are ServiceSettings' defaults)
MODES: dict[str, dict[str, Any]] = {
    "noadapt": {"method": "noadapt"},
    "tent+sgd": {"method": "tent", "optimizer": "sgd"},
    "eata": {"method": "eata"},                              # the service's default method and optimizer
    "foa+mgg": {"method": "foa", "optimizer": "mgg"},
}
#: the mode whose engine the multi-stream comparison runs (the default service)
MULTI_MODE = "eata"

#: timm models with random weights: creation kwargs for an image size, and the bundled MGG meta-network they use
TIMM_MODELS: dict[str, dict[str, Any]] = {
    "vit_base_patch16_224": {"size_kwargs": lambda s: {"img_size": s}, "mgg": "vit"},
    "resnet50": {"size_kwargs": lambda s: {}, "mgg": "resnet"},
}
#: a random-weight model is never confident: methods that filter images by confidence get their filters opened, so
#: that every image is adapted on (the compute a confident, trained model would cost). EATA: an entropy margin just
#: above the largest entropy, ln 1000 (its sample weight exp(margin - entropy) stays finite), and any similarity.
RANDOM_WEIGHT_METHOD_KWARGS: dict[str, dict[str, float]] = {"eata": {"e_margin": math.log(1000.0) + 1.0,
                                                                     "d_margin": 2.0}}
BUNDLED_MODELS = ("resnet", "vit")

#: sizes of a full run and of --quick, per device type (CPU quick runs are for exercising the script, and update
#: every batch there: update_images 0 = the service's default, which at batch 64 also updates every batch)
PROFILES: dict[tuple[str, bool], dict[str, int]] = {
    ("cuda", False): {"batch": 64, "streams": 16, "stream_images": 4, "big_streams": 2, "iters": 20, "warmup": 5,
                      "img_size": 224, "update_images": 0},
    ("cuda", True): {"batch": 64, "streams": 16, "stream_images": 4, "big_streams": 2, "iters": 6, "warmup": 2,
                     "img_size": 224, "update_images": 0},
    ("cpu", False): {"batch": 64, "streams": 16, "stream_images": 4, "big_streams": 2, "iters": 5, "warmup": 1,
                     "img_size": 224, "update_images": 0},
    ("cpu", True): {"batch": 8, "streams": 4, "stream_images": 2, "big_streams": 2, "iters": 2, "warmup": 1,
                    "img_size": 32, "update_images": 8},
}
SMOKE_TESTS = "resnet-foa-mgg or saved_on or service_on or load_on_cuda"


@dataclass
class Row:
    """One measured case."""

    model: str
    mode: str
    call: str                       # "step" (one stream) or "step_many" (several streams per call)
    layout: str                     # "1x64" = 1 stream of 64 images per call; "16x4" = 16 streams of 4
    img_per_s: float | None = None
    ms_per_call: float | None = None
    calls: int = 0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ device
def device_available(device: str) -> bool:
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        return True
    backend = getattr(torch, kind, None)   # torch.cuda, torch.mps, torch.xpu, ...
    return bool(backend is not None and backend.is_available())


def sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def protocol(args: argparse.Namespace, sizes: dict[str, int]) -> dict[str, Any]:
    """Everything a reader needs to reproduce or compare the numbers."""
    import timm
    import torch

    dev: dict[str, Any] = {"device": args.device}
    if torch.device(args.device).type == "cuda":
        props = torch.cuda.get_device_properties(args.device)
        dev.update(name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), tf32_conv=torch.backends.cudnn.allow_tf32,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    else:
        dev.update(name=platform.processor() or platform.machine(), cpus=os.cpu_count())
    return {
        **dev, "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "dtype": "float32", "quick": args.quick, **sizes,
        "inputs": "bundled models: MNIST-5k test digits through the model's preprocessing; timm models: N(0,1); "
                  "float32 CPU tensors moved to the device by the engine (as the service's are)",
        "random_weight_method_kwargs": RANDOM_WEIGHT_METHOD_KWARGS,
        "settings": "ServiceSettings defaults + the mode's method/optimizer", "modes": MODES,
        "multi_mode": MULTI_MODE, "timm_weights": "random (pretrained=False, torch.manual_seed(0))",
        "commit": _commit(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ part 1: tests
def cuda_test_files() -> list[str]:
    """The test modules that hold ``cuda``-marked tests (only these are collected: the others may import packages
    a GPU machine lacks, e.g. tritonclient or ray)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.cuda" in p.read_text(encoding="utf-8"))


def run_tests(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """``pytest -m cuda`` on the device under test; the summary line, the exit code and the log file."""
    if args.tests == "none":
        return {"selection": "none", "rc": 0, "summary": "not run (--tests none)"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *cuda_test_files()]
    if args.tests == "smoke":
        cmd += ["-k", SMOKE_TESTS]
    env = {**os.environ, "MGG_TEST_DEVICE": args.device, "HF_HUB_OFFLINE": "1"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"gpu_check: tests: {' '.join(cmd[1:])} (MGG_TEST_DEVICE={args.device})", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.test_timeout)
        rc, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        partial = [v.decode(errors="replace") if isinstance(v, bytes) else (v or "") for v in (exc.stdout, exc.stderr)]
        rc, log = 124, "".join(partial) + f"\ntimed out after {args.test_timeout} s"
    (out / "pytest.log").write_text(log)
    lines = [ln for ln in log.splitlines() if ln.strip()]
    summary = lines[-1] if lines else "(no output)"
    print(f"gpu_check: tests: {summary} (rc {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
    return {"selection": args.tests, "rc": rc, "summary": summary, "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------------ part 2: engines
def _settings(device: str, mode: str, sizes: dict[str, int], model: str = "resnet"):
    """ServiceSettings' defaults with the device, the mode's method/optimizer and, when set, update_images."""
    from service.settings import ServiceSettings

    kw: dict[str, Any] = {"model": model, "device": device, "log_level": "warning", **MODES[mode]}
    if sizes.get("update_images"):
        kw["update_images"] = sizes["update_images"]
    return ServiceSettings(_env_file=None, **kw)


def bundled_engine(name: str, mode: str, device: str, sizes: dict[str, int]):
    """The service's engine for a bundled classifier, and batches of real test digits at its own input size."""
    import numpy as np
    import torch

    from mgg_core.data.sources import mnist5k
    from service.runtime import load_runtime

    rt = load_runtime(_settings(device, mode, sizes, name))
    src = mnist5k("test")

    def batch(n: int, k: int) -> torch.Tensor:   # real test digits (the models are confident on them)
        idx = (np.arange(n) + 97 * k) % len(src)
        return rt.preprocessor(np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8))

    return rt.engine, batch


def timm_engine(name: str, mode: str, device: str, sizes: dict[str, int]):
    """A timm model with random weights, adapted by the engine the service would build for it."""
    import timm
    import torch

    from mgg_core.assets import DEFAULT_MGG_CHECKPOINTS
    from mgg_core.engine import AdaptationEngine, EngineConfig
    from mgg_core.features import compute_source_stats
    from mgg_core.methods import build_method
    from service.runtime import engine_config

    spec, img_size = TIMM_MODELS[name], sizes["img_size"]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000, **spec["size_kwargs"](img_size)).eval()
    settings = _settings(device, mode, sizes)
    kwargs = RANDOM_WEIGHT_METHOD_KWARGS.get(settings.method, {})
    method = build_method(settings.method, 1000, **kwargs)
    config = engine_config(settings, method, device, str(DEFAULT_MGG_CHECKPOINTS[spec["mgg"]]))
    config.method_kwargs = dict(kwargs)
    stats = None
    if method.needs_features:   # FOA's source statistics: from random images, as the weights are random too
        probe = AdaptationEngine(model, EngineConfig(method="noadapt", device=device), num_classes=1000)
        gen = torch.Generator().manual_seed(1)
        stats = compute_source_stats(probe.source_features,
                                     [torch.randn(16, 3, img_size, img_size, generator=gen) for _ in range(2)])
        del probe

    def batch(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(100 + k))

    return AdaptationEngine(model, config, num_classes=1000, source_stats=stats), batch


def engine_factory(name: str) -> Callable:
    return bundled_engine if name in BUNDLED_MODELS else timm_engine


# ------------------------------------------------------------------------------------------------ part 2: timing
def _timed(call: Callable[[], None], n: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        call()
    sync(device)
    return time.perf_counter() - t0


def bench_single(engine, batch: Callable, model: str, mode: str, sizes: dict[str, int], device: str) -> Row:
    """One stream, ``batch`` images per ``engine.step``."""

    b = sizes["batch"]
    xs = [batch(b, k) for k in range(4)]
    state = engine.new_state()
    it = iter(range(10**9))

    def call() -> None:
        engine.step(state, xs[next(it) % len(xs)])

    _timed(call, sizes["warmup"], device)
    secs = _timed(call, sizes["iters"], device)
    row = Row(model, mode, "step", f"1x{b}", img_per_s=b * sizes["iters"] / secs,
              ms_per_call=1e3 * secs / sizes["iters"], calls=sizes["iters"],
              extra={"updates": state.step, "skipped": state.skipped})
    if engine.method.needs_grad and state.step == 0 and sizes["batch"] >= engine.update_images:
        row.extra["warning"] = "no update taken: the timing is of skipped steps"
    return row


def bench_multi(engine, batch: Callable, model: str, sizes: dict[str, int], device: str,
                streams: int, per_stream: int) -> Row:
    """``streams`` streams of ``per_stream`` images per ``engine.step_many`` call; as many images in total as
    ``iters`` calls of ``big_streams`` x ``batch``, so both layouts see the same number of images."""

    total = sizes["iters"] * sizes["big_streams"] * sizes["batch"]
    calls = max(1, total // (streams * per_stream))
    xs = [[batch(per_stream, 2 * streams * r + i) for i in range(streams)] for r in range(2)]
    states = [engine.new_state(seed=i) for i in range(streams)]
    it = iter(range(10**9))

    def call() -> None:
        engine.step_many(list(zip(states, xs[next(it) % 2], strict=True)))

    _timed(call, sizes["warmup"], device)
    secs = _timed(call, calls, device)
    n = streams * per_stream * calls
    return Row(model, MULTI_MODE, "step_many", f"{streams}x{per_stream}", img_per_s=n / secs,
               ms_per_call=1e3 * secs / calls, calls=calls, extra={"updates": sum(s.step for s in states)})


def bench_model(name: str, sizes: dict[str, int], device: str) -> list[Row]:
    """Every mode of one model, then the multi-stream layouts on the default-service engine."""
    import torch

    rows: list[Row] = []
    for mode in MODES:
        try:
            engine, batch = engine_factory(name)(name, mode, device, sizes)
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            row = bench_single(engine, batch, name, mode, sizes, device)
            if torch.device(device).type == "cuda":
                row.extra["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            rows.append(row)
            if mode == MULTI_MODE:
                rows.append(bench_multi(engine, batch, name, sizes, device, sizes["streams"], sizes["stream_images"]))
                rows.append(bench_multi(engine, batch, name, sizes, device, sizes["big_streams"], sizes["batch"]))
            del engine
        except Exception as exc:  # noqa: BLE001 - one failing case is recorded; the others still run
            rows.append(Row(name, mode, "-", "-", error=f"{type(exc).__name__}: {exc}"))
        _print_row(rows[-1])
    return rows


def _print_row(r: Row) -> None:
    what = f"{r.img_per_s:9.1f} img/s  {r.ms_per_call:8.2f} ms/call" if r.img_per_s else f"ERROR {r.error}"
    print(f"gpu_check: bench {r.model:22s} {r.mode:9s} {r.call:9s} {r.layout:6s} {what}", flush=True)


# ------------------------------------------------------------------------------------------------ report
def ratios(rows: list[Row], sizes: dict[str, int]) -> list[dict[str, Any]]:
    """adapt / noadapt per model and mode; small-streams / big-streams per model."""
    ok = {(r.model, r.mode, r.call, r.layout): r.img_per_s for r in rows if r.img_per_s}
    single, small = f"1x{sizes['batch']}", f"{sizes['streams']}x{sizes['stream_images']}"
    big = f"{sizes['big_streams']}x{sizes['batch']}"
    out = []
    for model in dict.fromkeys(r.model for r in rows):
        base = ok.get((model, "noadapt", "step", single))
        for mode in MODES:
            v = ok.get((model, mode, "step", single))
            if mode != "noadapt" and base and v:
                out.append({"model": model, "ratio": f"{mode} / noadapt", "value": round(v / base, 3)})
        s, b = ok.get((model, MULTI_MODE, "step_many", small)), ok.get((model, MULTI_MODE, "step_many", big))
        if s and b:
            out.append({"model": model, "ratio": f"{small} / {big} ({MULTI_MODE})", "value": round(s / b, 3)})
    return out


def markdown(report: dict[str, Any]) -> str:
    p = report["protocol"]
    lines = [f"## GPU check on {p['device']} ({p.get('name')}), torch {p['torch']}, timm {p['timm']}", "",
             f"tests ({report['tests']['selection']}): {report['tests']['summary']}", "",
             "| model | mode | call | streams x images | img/s | ms/call | notes |", "|---|---|---|---|---:|---:|---|"]
    for r in report["rows"]:
        notes = r["error"] or ", ".join(f"{k} {v}" for k, v in r["extra"].items())
        ips = f"{r['img_per_s']:.1f}" if r["img_per_s"] else "-"
        ms = f"{r['ms_per_call']:.2f}" if r["ms_per_call"] else "-"
        lines.append(f"| {r['model']} | {r['mode']} | {r['call']} | {r['layout']} | {ips} | {ms} | {notes} |")
    lines += ["", "| model | ratio | value |", "|---|---|---:|"]
    lines += [f"| {r['model']} | {r['ratio']} | {r['value']:.3f} |" for r in report["ratios"]]
    if report["not_run"]:
        lines += ["", f"not run (time budget): {', '.join(report['not_run'])}"]
    keys = ("batch", "streams", "stream_images", "big_streams", "iters", "warmup", "img_size", "update_images",
            "torch_threads",
            "dtype", "commit")
    lines += ["", "protocol: " + ", ".join(f"{k} {p[k]}" for k in keys)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="device under test (default cuda; cpu exercises the check)")
    p.add_argument("--quick", action="store_true", help="fewer iterations (and tiny sizes on cpu)")
    p.add_argument("--out", type=Path, default=REPO / "gpu-check-out", help="folder for gpu_check.json/.md")
    p.add_argument("--tests", choices=["all", "smoke", "none"], default="all", help="which CUDA tests run")
    p.add_argument("--models", nargs="+", default=[*BUNDLED_MODELS, *TIMM_MODELS],
                   choices=[*BUNDLED_MODELS, *TIMM_MODELS], help="models to benchmark")
    p.add_argument("--no-bench", action="store_true", help="run the tests only")
    for name in ("batch", "streams", "stream_images", "big_streams", "iters", "warmup", "img_size", "update_images"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help="override the profile's size")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--test-timeout", type=float, default=300.0, help="seconds for the test part")
    p.add_argument("--time-budget", type=float, default=480.0,
                   help="seconds for the whole run: models not started by then are skipped and reported")
    args = p.parse_args(argv)
    for name in ("batch", "streams", "stream_images", "big_streams", "iters", "img_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    return args


def sizes_for(args: argparse.Namespace) -> dict[str, int]:
    import torch

    kind = "cpu" if torch.device(args.device).type == "cpu" else "cuda"
    sizes = dict(PROFILES[(kind, args.quick)])
    sizes.update({k: getattr(args, k) for k in sizes if getattr(args, k) is not None})
    return sizes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not device_available(args.device):
        print(f"gpu_check: no CUDA device: skipped ({args.device} is not available; torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda})", flush=True)
        return 0
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = sizes_for(args)
    report: dict[str, Any] = {"protocol": protocol(args, sizes), "rows": [], "not_run": []}
    report["tests"] = run_tests(args, args.out)
    rows: list[Row] = []
    for model in [] if args.no_bench else args.models:
        if time.perf_counter() - t_start > args.time_budget:
            report["not_run"].append(model)
            continue
        rows += bench_model(model, sizes, args.device)
    report["rows"] = [asdict(r) for r in rows]
    report["ratios"] = ratios(rows, sizes)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (args.out / "gpu_check.md").write_text(md)
    print(md, flush=True)
    failed = report["tests"]["rc"] not in (0, 5) or any(r.error for r in rows)
    print(f"gpu_check: {'FAILED' if failed else 'ok'} in {report['seconds']:.0f} s; wrote {args.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
