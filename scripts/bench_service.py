#!/usr/bin/env python
"""Throughput of adapted /predict (HTTP, `mgg serve` in its own process) vs the same adapt loop in-process.

The in-process loop is what the server does per request minus HTTP: preprocess the uint8 batch with the model's
own data config, then ``engine.step(state, x)`` on one stream. The service is measured with sequential requests
on one stream (batches of one stream are applied one at a time anyway), bodies encoded before timing, for
multipart PNG and for application/x-npy. Prints images/s and the ratio service / in-process.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_service.py --model resnet --batch-size 64 --batches 40
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def digits(n: int) -> np.ndarray:
    from mgg_core.data.sources import mnist5k

    src = mnist5k("test")
    idx = np.arange(n) % len(src)
    return np.stack([src.get_image(int(i)) for i in idx]).astype(np.uint8)


def png_multipart(batch: np.ndarray) -> tuple[bytes, str]:
    from PIL import Image

    boundary = "benchBoundary7MA4YWxkTrZu0gW"
    out = io.BytesIO()
    for i, a in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                  f"Content-Type: image/png\r\n\r\n".encode())
        out.write(buf.getvalue() + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def npy_body(batch: np.ndarray) -> tuple[bytes, str]:
    buf = io.BytesIO()
    np.save(buf, batch, allow_pickle=False)
    return buf.getvalue(), "application/x-npy"


class InProcess:
    """The adapt loop without HTTP: preprocess + engine.step on one stream, same settings as the server."""

    def __init__(self, settings, warmup_batches: list[np.ndarray]) -> None:
        from service.app import load_runtime

        self.rt = load_runtime(settings)
        self._run(warmup_batches)

    def run(self, batches: list[np.ndarray]) -> dict[str, float]:
        """Runs in a worker thread, like the server's steps (asyncio.to_thread): on a busy CPU, torch's
        intra-op threading behaves very differently in the main thread, which would skew the ratio."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(self._run, batches).result()

    def _run(self, batches: list[np.ndarray]) -> dict[str, float]:
        import torch

        rt = self.rt
        state = rt.engine.new_state()
        n_img, t_pre, t_step = 0, 0.0, 0.0
        for b in batches:
            t0 = time.perf_counter()
            x = rt.preprocessor(b).to(rt.device)
            t1 = time.perf_counter()
            rt.engine.step(state, x)
            if rt.device.startswith("cuda"):
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            t_pre += t1 - t0
            t_step += t2 - t1
            n_img += len(b)
        return {"images": n_img, "seconds": t_pre + t_step, "img_s": n_img / (t_pre + t_step),
                "step_only_img_s": n_img / t_step}


def start_server(args, snapshot_dir: str):
    """`mgg serve` in its own process (as deployed), same settings as the in-process loop; started and ready."""
    from mgg_replay.server import ServerProcess, serve_command

    flags = ["--snapshot-dir", snapshot_dir, "--model", args.model, "--device", args.device, "--log-level", "warning",
             "--max-images", str(max(64, args.batch_size)), "--max-body-bytes", str(256 * 1024 * 1024)]
    for flag in ("method", "optimizer", "lr", "mgg_checkpoint"):
        v = getattr(args, flag)
        if v is not None:
            flags += [f"--{flag.replace('_', '-')}", str(v)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MGG_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return ServerProcess(lambda port: serve_command(port, *flags), env, ready_timeout=300, capture=True,
                         inherit_env=False).start()


def over_http(client, bodies: list[tuple[bytes, str]], n_images: list[int], stream: str) -> dict[str, float]:
    """Sequential adapted /predict requests on one fresh stream."""
    t0 = time.perf_counter()
    steps = 0
    for body, ctype in bodies:
        r = client.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": stream})
        r.raise_for_status()
        steps += int(r.json()["adapted"])
    dt = time.perf_counter() - t0
    n = sum(n_images)
    return {"images": n, "seconds": dt, "img_s": n / dt, "adapted_batches": steps}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet", help="'vit', 'resnet' or a classifier checkpoint")
    p.add_argument("--method", default=None, help="default: the service default")
    p.add_argument("--optimizer", default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--mgg-checkpoint", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=40, help="timed batches")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds; medians are reported")
    args = p.parse_args(argv)

    from service.settings import ServiceSettings

    overrides = {k: getattr(args, k) for k in ("method", "optimizer", "lr", "mgg_checkpoint")
                 if getattr(args, k) is not None}
    settings = ServiceSettings(_env_file=None, model=args.model, device=args.device, **overrides)
    total = args.warmup + args.batches
    data = digits(total * args.batch_size)
    batches = [data[i * args.batch_size:(i + 1) * args.batch_size] for i in range(total)]
    print(f"model={settings.model} method={settings.method} optimizer={settings.optimizer} lr={settings.lr} "
          f"device={args.device} batch={args.batch_size} timed_batches={args.batches} (MNIST-5k digits, 28x28)")

    import httpx

    warm, timed = batches[:args.warmup], batches[args.warmup:]
    local = InProcess(settings, warm)
    encoded = {name: [enc(b) for b in batches] for name, enc in (("npy", npy_body), ("multipart PNG", png_multipart))}
    sizes = [len(b) for b in timed]
    rows: dict[str, list[float]] = {"in-process": [], "npy": [], "multipart PNG": []}
    with tempfile.TemporaryDirectory() as snaps:
        server = start_server(args, snaps)
        try:
            with httpx.Client(base_url=server.url, timeout=600) as client:
                for name, bodies in encoded.items():  # warm the server's paths
                    over_http(client, bodies[:args.warmup], [len(b) for b in warm], f"warm-{name[:3]}")
                # rounds alternate the three loops so that load from other processes hits them alike
                for r in range(args.rounds):
                    res = local.run(timed)
                    rows["in-process"].append(res["img_s"])
                    line = (f"round {r + 1}: in-process {res['img_s']:8.1f} img/s "
                            f"(step alone {res['step_only_img_s']:.1f})")
                    for name, bodies in encoded.items():
                        h = over_http(client, bodies[args.warmup:], sizes, f"bench-{name[:3]}-{r}")
                        assert h["adapted_batches"] == len(timed), h
                        rows[name].append(h["img_s"])
                        line += f" | {name} {h['img_s']:8.1f} img/s"
                    print(line, flush=True)
        finally:
            server.stop(timeout=60)
    base = float(np.median(rows["in-process"]))
    kib = {name: sum(len(b) for b, _ in bodies[args.warmup:]) / len(timed) / 1024 for name, bodies in encoded.items()}
    print(f"median over {args.rounds} rounds ({len(timed)} batches of {args.batch_size} each); the ratio is the "
          f"median of the per-round ratios (each round measures both back to back):")
    print(f"  in-process adapt loop (preprocess + step) {base:9.1f} img/s")
    for name in ("npy", "multipart PNG"):
        m = float(np.median(rows[name]))
        ratio = float(np.median([h / i for h, i in zip(rows[name], rows["in-process"], strict=False)]))
        print(f"  HTTP /predict, {name:<14}            {m:9.1f} img/s   ratio {ratio:.2f}"
              f"   ({kib[name]:.0f} KiB/request)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
