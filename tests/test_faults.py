"""Fault injection against the service (issue 13): every defect found by the adversarial pass, reproduced and held.

Loopback only, bounded in count and time; servers stop by themselves. Faults are injected through the real HTTP
surface (raw sockets for slow or silent clients, tampered files on disk, kill -9 of a real `mgg serve` process)
or, where the fault is the machine's (a failing disk), by replacing the store's file writer in-process.
"""
from __future__ import annotations

import io
import json
import socket
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import metric, npy_bytes, png_bytes, serve_process, service_settings

from mgg_replay.server import kill9_restart
from service.decode import DecodeError, DecodeLimits, PixelBudget, decode_body, decode_npy, probe_image
from service.settings import ServiceSettings

REPO = Path(__file__).resolve().parents[1]
TOKEN = "fault-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {"Content-Type": "application/x-npy"}


def settings_for(snapshot_dir: Path, **kw) -> ServiceSettings:
    return service_settings(snapshot_dir, **{"admin_token": TOKEN, "state_budget_bytes": 40_000, **kw})


def predict(c: httpx.Client, sid: str, x: np.ndarray) -> httpx.Response:
    return c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": sid})


def ok(c: httpx.Client, sid: str, x: np.ndarray) -> dict:
    r = predict(c, sid, x)
    assert r.status_code == 200, r.text
    return r.json()


def scores(resp: dict) -> list[list[float]]:
    return [[p["label"], p["score"], p["entropy"], *[t["score"] for t in p["topk"]]] for p in resp["predictions"]]


def server_errors(c: httpx.Client) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(c.get("/metrics").text)
               for s in fam.samples if s.name == "tta_http_requests_total" and s.labels["status"].startswith("5"))


def wait_for(cond, timeout: float = 20.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise TimeoutError("condition not reached")


def no_internals(body: str, *secrets: str) -> None:
    assert "Traceback" not in body and "/work/" not in body and "/tmp/" not in body, body
    for s in secrets:
        assert s not in body, body


# ------------------------------------------------------------------------------------ 2. pixel budget


def bomb_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (4096, 4096), 7).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def multipart(files: list[bytes], boundary: str = "fAuLt") -> tuple[bytes, dict]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for i, data in enumerate(files)
    ) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_pixel_bomb_is_refused_before_decoding(live_server, tmp_path):
    png = bomb_png()
    body, headers = multipart([png] * 64)
    assert len(body) < 1_600_000  # ~1.4 MB that would decode to 64 x 16.7 M pixels
    srv = live_server(settings_for(tmp_path / "s", max_images=64, max_body_bytes=4 * 1024 * 1024))
    with srv.client() as c:
        before = _rss_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
        r = c.post("/predict", content=body, headers={**headers, "X-Stream-Id": "bomb"})
        rise = _rss_mb("VmHWM") - before
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_pixels" and str(srv.settings.max_request_pixels) in err["message"]
        assert rise < 300, f"peak RSS rose by {rise:.0f} MB"
        assert c.get("/streams/bomb", headers=AUTH).status_code == 404  # no state touched
        # two such images are within every limit and are served
        one, h1 = multipart([png, png])
        assert c.post("/predict", content=one, headers={**h1, "X-Stream-Id": "bomb"}).status_code == 200


def test_max_request_pixels_is_a_setting(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", max_request_pixels=3 * 28 * 28))
    with srv.client() as c:
        assert ok(c, "px", digit_images[:3])["step"] == 1
        r = predict(c, "px", digit_images[:4])
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
        body, headers = multipart([png_bytes(a) for a in digit_images[:4]])
        r = c.post("/predict", content=body, headers={**headers, "X-Stream-Id": "px"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_pixels"
        assert c.get("/streams/px", headers=AUTH).json()["step"] == 1


def test_pixels_in_flight_budget_refuses_then_releases(digit_images):
    limits = DecodeLimits(max_images=8, max_image_pixels=64 * 64, max_request_pixels=10_000)
    budget = PixelBudget(4 * 28 * 28)
    body, headers = multipart([png_bytes(a) for a in digit_images[:3]])
    held = decode_body(body, headers["Content-Type"], limits, budget)
    assert budget.used == 3 * 28 * 28 and held.pixels == 3 * 28 * 28
    with pytest.raises(DecodeError) as info:  # 3 + 3 images > 4 in flight
        decode_body(body, headers["Content-Type"], limits, budget)
    assert info.value.code == "pixels_in_flight" and info.value.status == 503
    assert "Retry-After" in info.value.headers
    assert budget.used == 3 * 28 * 28  # the refused request reserved nothing
    held.release()
    assert budget.used == 0 and held.images is None
    held.release()  # idempotent
    again = decode_body(npy_bytes(digit_images[:4]), "application/x-npy", limits, budget)
    assert budget.used == 4 * 28 * 28
    again.release()
    assert budget.used == 0


def _ico_with_png(png: bytes, declared: int = 16) -> bytes:
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared, declared, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def test_ico_is_measured_from_headers_not_decoded(monkeypatch):
    from PIL import IcoImagePlugin

    loads = []
    monkeypatch.setattr(IcoImagePlugin.IcoImageFile, "load", lambda self: loads.append(1))
    big = _ico_with_png(bomb_png())  # the directory claims 16x16; the embedded PNG is 4096x4096
    limits = DecodeLimits(max_image_pixels=1024 * 1024)
    with pytest.raises(DecodeError) as info:
        probe_image(big, "x.ico", limits)
    assert info.value.code == "image_too_large" and info.value.status == 413
    assert loads == []  # nothing was decoded
    body, headers = multipart([big])
    with pytest.raises(DecodeError) as info:
        decode_body(body, headers["Content-Type"], limits)
    assert info.value.code == "image_too_large" and loads == []
    monkeypatch.undo()
    small = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32), (1, 2, 3)).save(small, format="ICO", sizes=[(32, 32)])
    assert probe_image(small.getvalue(), "ok.ico", limits) == 32 * 32
    body, headers = multipart([small.getvalue()])
    batch = decode_body(body, headers["Content-Type"], limits)
    assert batch.images[0].size == (32, 32)


# --------------------------------------------------------------------------------- 6. npy header dims


def _npy_with_shape(shape_literal: str, payload: bytes = b"") -> bytes:
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': " + shape_literal + ", }"
    header = header.ljust(118) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin-1") + payload


@pytest.mark.parametrize("shape", ["(-1, 28, 28)", "(2, -28, 28)", "(True, 28, 28)", "(2, 28, False, 3)",
                                   "(2, 28, 28, -3)"])
def test_npy_negative_or_boolean_dims_are_400(shape):
    with pytest.raises(DecodeError) as info:
        decode_npy(_npy_with_shape(shape, b"\0" * 64), DecodeLimits())
    assert info.value.status == 400 and info.value.code == "invalid_npy_shape"


def test_npy_bad_dims_over_http_are_400(live_server, tmp_path):
    srv = live_server(settings_for(tmp_path / "s"))
    with srv.client() as c:
        before = server_errors(c)
        for shape in ("(-1, 28, 28)", "(True, 28, 28)"):
            r = c.post("/predict", content=_npy_with_shape(shape, b"\0" * 64), headers={**NPY, "X-Stream-Id": "n"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_npy_shape", r.text
        assert server_errors(c) == before


# ------------------------------------------------------------------------------- 5. kill -9 durability


@pytest.mark.timeout(500)
def test_kill_9_loses_no_acknowledged_step_under_the_defaults(tmp_path, digit_images):
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    # 24-image requests: under the default gradient window (64 images) some streams update before the crash and
    # some carry accumulated gradients and BatchNorm statistics across it; all of it must survive
    batches = [digit_images[(k * 4) % 8:(k * 4) % 8 + 24] for k in range(5)]
    probe = digit_images[24:32]
    streams = [f"s{i}" for i in range(4)]

    def history(c: httpx.Client, prefix: str = "") -> dict[str, int]:
        acked: dict[str, int] = {}
        for k, x in enumerate(batches):
            for i, sid in enumerate(streams[: 1 + (k % 4)] if k < 4 else streams):
                acked[sid] = ok(c, prefix + sid, x if i % 2 == 0 else x[::-1])["step"]
        return acked

    def check(c: httpx.Client, acked: dict[str, int]) -> None:
        assert sum(acked.values()) > 0
        for sid, step in acked.items():
            info = c.get(f"/streams/{sid}", headers=AUTH).json()
            assert info["step"] == step, (sid, info)
        history(c, "twin-")  # same predictions as a twin that never crashed: the acknowledged history on fresh ids
        for _ in range(2):  # the second probe completes stream s0's pending window (48 + 8 + 8 images)
            for sid in streams:
                got, want = ok(c, sid, probe), ok(c, "twin-" + sid, probe)
                assert got["step"] == want["step"] and scores(got) == scores(want)
        assert ok(c, "s0", probe)["step"] == acked["s0"] + 1

    kill9_restart(lambda: serve_process(snaps, "--admin-token", TOKEN), history, check, timeout=60)


def test_durability_interval_bounds_and_meters_unpersisted_steps(live_server, tmp_path, digit_images):
    snaps = tmp_path / "s"
    srv = live_server(settings_for(snaps, durability="interval", snapshot_interval_steps=3,
                                   snapshot_interval_seconds=3600))
    x = digit_images[:8]
    with srv.client() as c:
        ok(c, "iv", x)
        ok(c, "iv", x)
        assert metric(c, "tta_steps_unpersisted") == 2
        assert not (snaps / "iv.safetensors").exists()
        ok(c, "iv", x)  # the 3rd step reaches the bound: written in the background
        wait_for(lambda: metric(c, "tta_steps_unpersisted") == 0)
        assert (snaps / "iv.safetensors").is_file()
    srv2 = live_server(settings_for(tmp_path / "t", durability="interval", snapshot_interval_steps=1000,
                                    snapshot_interval_seconds=0.3))
    with srv2.client() as c:
        ok(c, "sec", x)
        # the file appears at its rename; the gauge moves once the write returns (after the folder's fsync)
        wait_for(lambda: (tmp_path / "t" / "sec.safetensors").is_file()
                 and metric(c, "tta_steps_unpersisted") == 0, timeout=5)


def test_durable_write_failure_is_not_acknowledged(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s"))
    store = srv.app.state.svc.store
    x = digit_images[:8]
    with srv.client() as c:
        ref = [ok(c, "ref", x) for _ in range(2)]
        ok(c, "w", x)
        real = store._write_files

        def failing(*a, **kw):
            raise OSError(28, "No space left on device (injected)")

        store._write_files = failing
        try:
            before = server_errors(c)
            r = predict(c, "w", x)
            assert r.status_code == 507 and r.json()["error"]["code"] == "snapshot_write_failed", r.text
            no_internals(r.text, "injected")
            assert server_errors(c) - before == 1  # a real server-side fault: it is counted
            r = c.post("/streams/w/snapshot", headers=AUTH)  # nothing to write: its state is on disk already
            assert r.status_code == 200 and r.json()["snapshot"] is True
        finally:
            store._write_files = real
        assert c.get("/streams/w", headers=AUTH).json()["step"] == 1  # the refused step was not kept
        got = ok(c, "w", x)
        assert got["step"] == 2 and scores(got) == scores(ref[1])


def test_snapshot_endpoint_does_not_answer_200_when_the_write_fails(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", durability="interval", snapshot_interval_steps=1000,
                                   snapshot_interval_seconds=3600))
    store = srv.app.state.svc.store
    with srv.client() as c:
        ok(c, "snap", digit_images[:8])
        real = store._write_files
        store._write_files = lambda *a, **kw: (_ for _ in ()).throw(OSError(5, "I/O error (injected)"))
        try:
            r = c.post("/streams/snap/snapshot", headers=AUTH)
            assert r.status_code == 507 and r.json()["error"]["code"] == "snapshot_write_failed", r.text
            no_internals(r.text, "injected")
        finally:
            store._write_files = real
        r = c.post("/streams/snap/snapshot", headers=AUTH)
        assert r.status_code == 200 and r.json()["snapshot"] is True


# ---------------------------------------------------------------------------- 4, 10. tampered files


def _tamper(snaps: Path) -> None:
    """Damage one stream per case (the stream ids name the damage)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    def rewrite(sid: str, change) -> None:
        path = snaps / f"{sid}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is no dict
        change(tensors, meta)
        save_file(tensors, str(path), metadata=meta)

    def listing(sid: str, **fields) -> None:  # the listing data in the snapshot's header
        rewrite(sid, lambda t, m: m.update(listing=json.dumps({**json.loads(m["listing"]), **fields})))

    import torch

    listing("t-bytes", bytes="lots")
    listing("t-step", step="abc")
    rewrite("t-json", lambda t, m: m.update(listing="{not json"))
    (snaps / "t-garbage.safetensors").write_bytes(b"definitely not safetensors")
    rewrite("t-shape", lambda t, m: t.update({"state.theta": torch.zeros(3)}))
    rewrite("t-missing", lambda t, m: t.pop("state.theta"))
    rewrite("t-extra", lambda t, m: t.update({"state.evil": torch.zeros(2)}))
    rewrite("t-dtype", lambda t, m: t.update({"state.theta": t["state.theta"].double()}))
    rewrite("t-nan", lambda t, m: t["state.theta"].__setitem__(0, float("nan")))
    rewrite("t-finger", lambda t, m: m.update(fingerprint=json.dumps({"model": "other"})))
    rewrite("t-scalar", lambda t, m: m.update(scalars=json.dumps({**json.loads(m["scalars"]), "step": "abc"})))


TAMPERED = ["t-bytes", "t-step", "t-json", "t-garbage", "t-shape", "t-missing", "t-extra", "t-dtype", "t-nan",
            "t-finger", "t-scalar"]


def test_snapshot_from_before_the_new_defaults_is_refused_clearly(live_server, tmp_path, digit_images):
    """A snapshot written under the defaults before 2026-11-30 (bn_momentum 0.1, no guard.hold_stats tensor) does not
    load silently: 500 snapshot_restore_failed naming what differs, then POST /reset starts the stream over."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    snaps, x = tmp_path / "s", digit_images[:8]
    ema = {"bn_stats": "ema"}
    old = live_server(settings_for(snaps, bn_momentum=0.1, bn_momentum_shallow=None, **ema))   # uniform momentum
    with old.client() as c:
        ok(c, "old", x)
    old.stop()
    path = snaps / "old.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["state.guard.hold_stats"]                  # the state layout before statistics-only holds
    save_file(tensors, str(path), metadata=meta)
    for momentum, named in ((None, "bn_momentum"), (0.1, "guard.hold_stats")):
        srv = live_server(settings_for(snaps, **ema, **({} if momentum is None else
                                                        {"bn_momentum": momentum, "bn_momentum_shallow": None})))
        with srv.client() as c:
            r = predict(c, "old", x)
            assert r.status_code == 500 and r.json()["error"]["code"] == "snapshot_restore_failed", r.text
            assert named in r.json()["error"]["message"] and "POST /reset" in r.json()["error"]["message"], r.text
            no_internals(r.text, str(snaps))
        srv.stop()
    srv = live_server(settings_for(snaps, **ema))
    with srv.client() as c:
        assert c.post("/reset", json={"stream_id": "old"}, headers=AUTH).status_code == 200
        assert ok(c, "old", x)["step"] == 1


def test_tampered_files_affect_only_their_own_stream(live_server, tmp_path, digit_images):
    snaps = tmp_path / "s"
    x = digit_images[:8]
    first = live_server(settings_for(snaps, state_budget_bytes=10**9))
    with first.client() as c:
        for sid in ["good", *TAMPERED]:
            ok(c, sid, x)
        ref = [ok(c, "ref", x) for _ in range(2)]
    first.stop()
    _tamper(snaps)
    srv = live_server(settings_for(snaps, state_budget_bytes=10**9))
    with srv.client() as c:
        assert c.get("/readyz").status_code == 200  # one bad file never blames the model
        listing = c.get("/streams", headers=AUTH)
        assert listing.status_code == 200, listing.text
        assert {s["stream_id"] for s in listing.json()["streams"]} >= {"good", *TAMPERED}
        for sid in TAMPERED:
            r = predict(c, sid, x)
            assert r.status_code == 500, (sid, r.text)
            err = r.json()["error"]
            assert err["code"] == "snapshot_restore_failed" and sid in err["message"], (sid, err)
            no_internals(r.text, str(snaps))
            assert c.get(f"/streams/{sid}", headers=AUTH).status_code == 200
        got = ok(c, "good", x)  # the healthy stream resumes exactly
        assert got["step"] == 2 and scores(got) == scores(ref[1])
        for sid in TAMPERED:  # /reset starts a damaged stream over
            assert c.post("/reset", json={"stream_id": sid}, headers=AUTH).status_code == 200
            assert ok(c, sid, x)["step"] == 1
        assert metric(c, "tta_snapshot_restore_failed_total") >= len(TAMPERED)


# ------------------------------------------------------------------------ 8, 9. bounded streams and disk


def test_stream_cap_holds_under_a_flood(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", max_streams=10))
    x = digit_images[:4]
    with srv.client() as c:
        codes = [predict(c, f"flood{i}", x).status_code for i in range(40)]
        assert codes.count(200) == 10 and codes.count(507) == 30
        r = predict(c, "one-more", x)
        assert r.json()["error"]["code"] == "too_many_streams" and "10" in r.json()["error"]["message"]
        assert ok(c, "flood3", x)["step"] == 2  # known streams keep working
        assert c.get("/streams", headers=AUTH).json()["streams_known"] == 10
        assert c.delete("/streams/flood0", headers=AUTH).status_code == 204
        assert ok(c, "one-more", x)["step"] == 1  # a freed place is usable again


def test_snapshot_disk_cap_holds_under_a_flood(live_server, tmp_path, digit_images):
    snaps = tmp_path / "s"
    cap = 200_000
    srv = live_server(settings_for(snaps, max_snapshot_bytes=cap))
    x = digit_images[:4]
    with srv.client() as c:
        codes = [predict(c, f"d{i}", x).status_code for i in range(30)]
        assert 200 in codes and 507 in codes
        assert {predict(c, "d-new", x).json()["error"]["code"]} == {"snapshot_disk_full"}
        on_disk = sum(p.stat().st_size for p in snaps.iterdir() if p.is_file())
        assert on_disk <= cap
        assert c.get("/streams", headers=AUTH).json()["snapshot_bytes"] <= cap


def test_memory_budget_holds_when_snapshot_writes_fail(live_server, tmp_path, digit_images):
    budget = 40_000
    srv = live_server(settings_for(tmp_path / "s", durability="interval", snapshot_interval_steps=1000,
                                   snapshot_interval_seconds=3600, state_budget_bytes=budget))
    store = srv.app.state.svc.store
    store._write_files = lambda *a, **kw: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    with srv.client() as c:
        for i in range(8):
            ok(c, f"m{i}", digit_images[:4])
        wait_for(lambda: store.resident_bytes <= budget)
        assert metric(c, "tta_steps_lost_total") >= 1  # dropped unpersisted steps are counted, not hidden
        assert c.get("/streams", headers=AUTH).json()["state_bytes"] <= budget


def test_budget_eviction_is_not_in_an_unrelated_requests_path(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", durability="interval", snapshot_interval_steps=1000,
                                   snapshot_interval_seconds=3600, state_budget_bytes=40_000))
    store = srv.app.state.svc.store
    real = store._write_files

    def slow(*a, **kw):
        time.sleep(2.0)
        return real(*a, **kw)

    with srv.client() as c:
        for i in range(2):
            ok(c, f"v{i}", digit_images[:4])
        store._write_files = slow
        t0 = time.perf_counter()
        ok(c, "v-new", digit_images[:4])  # trips the budget: a victim is written, but not before this answer
        assert time.perf_counter() - t0 < 1.5
        wait_for(lambda: store.resident_bytes <= 40_000, timeout=30)


def test_reset_all_streams_through_disk_without_loading(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", state_budget_bytes=40_000))
    store = srv.app.state.svc.store
    with srv.client() as c:
        for i in range(12):
            ok(c, f"r{i}", digit_images[:4])
        resident = c.get("/streams", headers=AUTH).json()["streams_resident"]
        assert resident <= 2
        r = c.post("/reset", json={"all": True}, headers=AUTH)
        assert r.status_code == 200 and len(r.json()["reset"]) == 12
        assert len(store._lru) <= resident and store.resident_bytes <= 40_000
        assert all(s["step"] == 0 for s in c.get("/streams", headers=AUTH).json()["streams"])
        assert ok(c, "r5", digit_images[:4])["step"] == 1


def test_idle_snapshots_are_deleted_after_the_retention_time(live_server, tmp_path, digit_images):
    snaps = tmp_path / "s"
    srv = live_server(settings_for(snaps, idle_seconds=0.2, idle_check_seconds=0.1, snapshot_retention_seconds=0.5))
    with srv.client() as c:
        ok(c, "old", digit_images[:4])
        assert (snaps / "old.safetensors").is_file()
        wait_for(lambda: c.get("/streams/old", headers=AUTH).status_code == 404, timeout=10)
        assert not (snaps / "old.safetensors").exists() and not (snaps / "old.json").exists()
        assert metric(c, "tta_streams_expired_total") == 1


def test_streams_listing_is_paginated(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", max_page_size=4))
    with srv.client() as c:
        for i in range(7):
            ok(c, f"p{i}", digit_images[:2])
        seen, after = [], None
        for _ in range(5):
            params = {"limit": 3, **({"after": after} if after else {})}
            page = c.get("/streams", params=params, headers=AUTH).json()
            seen += [s["stream_id"] for s in page["streams"]]
            after = page["next_after"]
            if after is None:
                break
        assert seen == [f"p{i}" for i in range(7)]
        r = c.get("/streams", params={"limit": 5}, headers=AUTH)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


# ------------------------------------------------------------------- 1. slow and silent request bodies


def _silent(port: int, sid: str, length: int = 100_000) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-npy\r\nX-Stream-Id: {sid}\r\n"
              f"Content-Length: {length}\r\n\r\n".encode())
    return s


def _closed_by_server(s: socket.socket, within: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection (True) or ``within`` seconds pass (False)."""
    s.settimeout(0.2)
    data, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, data
        if not chunk:
            return True, data
        data += chunk
    return False, data


@pytest.mark.timeout(240)
def test_silent_connections_hold_no_queue_slot_and_are_closed(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", body_idle_timeout_seconds=3, body_timeout_seconds=6,
                                   max_queue_total=256))
    x = digit_images[:4]
    with srv.client() as c:
        ok(c, "warm", x)
        t0 = time.perf_counter()
        ok(c, "baseline", x)
        # 2 s, or 3x a new stream's first request without them when the shared CPU is that slow right now
        bound = max(2.0, 3 * (time.perf_counter() - t0))
        socks = [_silent(srv.port, f"silent{i}") for i in range(256)]
        try:
            time.sleep(0.5)
            t0 = time.perf_counter()
            got = ok(c, "another", x)  # neither 429 queue_full nor a wait
            assert time.perf_counter() - t0 < bound and got["step"] == 1
            t0 = time.perf_counter()
            assert ok(c, "silent7", x)["step"] == 1  # a silent upload does not block its own stream either
            assert time.perf_counter() - t0 < bound
            assert metric(c, "tta_queue_depth") == 0
            results = [_closed_by_server(s, within=20) for s in socks]
        finally:
            for s in socks:
                s.close()
        assert all(closed for closed, _ in results), sum(not closed for closed, _ in results)
        answered = [data for _, data in results if data]
        assert answered and all(b" 408 " in d.split(b"\r\n", 1)[0] and b"body_timeout" in d for d in answered)
        assert metric(c, "tta_http_requests_total", status="408") == len(answered)
        assert c.get("/streams/silent3", headers=AUTH).status_code == 404  # nothing was created for them


def test_a_trickling_body_is_cut_by_the_total_body_timeout(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s", body_idle_timeout_seconds=1, body_timeout_seconds=2))
    body = npy_bytes(digit_images[:4])
    s = _silent(srv.port, "trickle", len(body))
    t0 = time.perf_counter()
    try:
        for i in range(40):  # one byte every 0.2 s: never idle for 1 s, but 8 s in all
            try:
                s.sendall(body[i:i + 1])
            except OSError:
                break
            time.sleep(0.2)
        closed, data = _closed_by_server(s, within=10)
    finally:
        s.close()
    assert closed and b" 408 " in data.split(b"\r\n", 1)[0] and b"whole body" in data
    assert time.perf_counter() - t0 < 6


# ---------------------------------------------------------------------------------- 7. hang-ups


def test_hang_ups_are_499_not_server_errors(live_server, tmp_path, digit_images, caplog):
    import logging

    srv = live_server(settings_for(tmp_path / "s"))
    body = npy_bytes(digit_images[:8])
    with srv.client() as c:
        ok(c, "warm", digit_images[:4])
        before = server_errors(c)
        with caplog.at_level(logging.INFO):
            for i in range(10):
                s = _silent(srv.port, f"hang{i}", len(body))
                s.sendall(body[: len(body) // 2])
                time.sleep(0.05)
                s.close()
            wait_for(lambda: metric(c, "tta_client_disconnects_total") == 10)
        assert server_errors(c) == before  # the 5xx alert does not see them
        assert metric(c, "tta_http_requests_total", status="499", route="/predict") == 10
        lines = [r for r in caplog.records if "disconnected" in r.getMessage()]
        assert len(lines) == 10 and not any(r.exc_info for r in lines)  # one line each, no traceback
        assert not any("Exception in ASGI application" in r.getMessage() for r in caplog.records)
        assert all(c.get(f"/streams/hang{i}", headers=AUTH).status_code == 404 for i in range(10))


# ------------------------------------------------------------------------------------ 11. internals


def test_error_bodies_carry_no_internals(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "s"))
    engine = srv.app.state.svc.runtime.engine
    real, real_many = engine.step, engine.step_many

    def broken(*a, **kw):
        raise RuntimeError(f"secret detail at {tmp_path}/internal/file.py")

    with srv.client() as c:
        engine.step = engine.step_many = broken  # the single step and the fused one (fused_steps, the default)
        try:
            before = server_errors(c)
            r = predict(c, "err", digit_images[:4])
        finally:
            engine.step, engine.step_many = real, real_many
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        no_internals(r.text, "secret", "RuntimeError", str(tmp_path))
        assert "request id" in r.json()["error"]["message"]
        assert server_errors(c) == before + 1  # a real server error is counted
        assert ok(c, "err", digit_images[:4])["step"] == 1  # the failed step was not kept (durability=step)


def test_info_hides_checkpoint_folders_without_the_token(live_server, tmp_path):
    srv = live_server(settings_for(tmp_path / "s"))
    with srv.client() as c:
        open_info = c.get("/info").json()["model"]
        admin_info = c.get("/info", headers=AUTH).json()["model"]
    assert "/" in admin_info["checkpoint"]
    assert "/" not in open_info["checkpoint"] and open_info["checkpoint"] == Path(admin_info["checkpoint"]).name
    assert "/" not in json.dumps(open_info)


def test_docs_work_offline(live_server, tmp_path):
    srv = live_server(settings_for(tmp_path / "s"))
    with srv.client() as c:
        html = c.get("/docs").text
        assert "cdn." not in html and "https://" not in html.split("<body>")[0].replace("https://fastapi", "")
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert f"/static-offline-docs/{asset}" in html
            r = c.get(f"/static-offline-docs/{asset}")
            assert r.status_code == 200 and len(r.content) > 10_000


def test_binding_beyond_loopback_never_leaves_admin_routes_open(live_server, tmp_path, digit_images, capsys):
    # the socket is still loopback (tests never bind elsewhere); the app sees host 0.0.0.0 in its settings
    srv = live_server(settings_for(tmp_path / "s", host="0.0.0.0", admin_token=None))
    printed = capsys.readouterr().err
    token = printed.split("generated admin token for this run: ")[1].split()[0]
    with srv.client() as c:
        ok(c, "adm", digit_images[:4])
        assert c.post("/reset", json={"all": True}).status_code == 401
        assert c.delete("/streams/adm").status_code == 401
        assert c.get("/streams", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    local = ServiceSettings(_env_file=None, host="127.0.0.1").with_safe_admin_token()
    assert local[1] is None and local[0].admin_token is None  # loopback: no token needed


def test_pixels_in_flight_setting_over_http(live_server, tmp_path, digit_images):
    """Request A holds its decoded pixels while it is preprocessed (held at a gate); B, within every per-request
    limit, finds the in-flight budget taken: 503 + Retry-After; once A is done the budget is free again."""
    # inline_max_pixels=0: the gated preprocessing runs in a worker thread (on the event loop it would block /metrics)
    srv = live_server(settings_for(tmp_path / "s", max_pixels_in_flight=6 * 28 * 28, inline_max_pixels=0))
    rt = srv.app.state.svc.runtime
    real, gate, entered = rt.preprocessor, threading.Event(), threading.Event()

    def gated(images):
        entered.set()
        gate.wait(30)
        return real(images)

    rt.preprocessor = gated
    result: dict[str, httpx.Response] = {}
    try:
        with srv.client() as c:
            def first() -> None:
                with srv.client() as c2:
                    result["a"] = predict(c2, "pa", digit_images[:4])

            t = threading.Thread(target=first)
            t.start()
            assert entered.wait(30)
            assert metric(c, "tta_pixels_in_flight") == 4 * 28 * 28
            r = predict(c, "pb", digit_images[:4])
            assert r.status_code == 503 and r.json()["error"]["code"] == "pixels_in_flight", r.text
            assert int(r.headers["retry-after"]) >= 1
            gate.set()
            t.join(60)
            assert result["a"].status_code == 200
            assert metric(c, "tta_pixels_in_flight") == 0
            rt.preprocessor = real
            assert ok(c, "pb", digit_images[:4])["step"] == 1
    finally:
        gate.set()
        rt.preprocessor = real


def test_compose_is_safe_by_default():
    import yaml

    cfg = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    env = cfg["x-service-env"]
    assert env["MGG_HOST"] == "0.0.0.0" and "MGG_ADMIN_TOKEN" in env  # beyond loopback: the app generates a token
    for name in ("service", "service-noadapt"):
        svc = cfg["services"][name]
        assert svc["stop_grace_period"] == "45s"
        assert all(str(p).startswith("${MGG_PUBLISH_ADDR:-127.0.0.1}:") for p in svc["ports"])


def test_resident_bytes_and_known_streams_stay_exact(live_server, tmp_path, digit_images):
    """The store keeps the resident bytes as a running total (no sum over the streams on a request's path) and
    counts known streams when scraped: both equal a recount from the streams' states after loads, steps, budget
    evictions, restores from disk, resets and deletions."""
    srv = live_server(settings_for(tmp_path / "s", state_budget_bytes=40_000))
    store = srv.app.state.svc.store
    x = digit_images[:4]

    def check(c) -> None:
        truth = sum(int(store._streams[sid].state.nbytes()) for sid in store._lru)
        assert store.resident_bytes == truth and metric(c, "tta_state_bytes") == truth
        known = sum(1 for e in store._streams.values() if e.known)
        assert metric(c, "tta_streams_known") == known == c.get("/streams", headers=AUTH).json()["streams_known"]

    with srv.client() as c:
        for i in range(6):
            ok(c, f"a{i}", x)
            check(c)
        wait_for(lambda: store.resident_bytes <= 40_000)
        check(c)
        assert len(store._lru) < 6  # the budget evicted some: they come back from disk
        for i in range(6):
            ok(c, f"a{i}", x)
        wait_for(lambda: store.resident_bytes <= 40_000)
        check(c)
        assert c.post("/reset", json={"stream_id": "a5"}, headers=AUTH).status_code == 200
        check(c)
        assert c.delete("/streams/a4", headers=AUTH).status_code == 204
        assert c.delete("/streams/a0", headers=AUTH).status_code == 204
        check(c)
        assert c.post("/reset", json={"all": True}, headers=AUTH).status_code == 200
        check(c)
        assert metric(c, "tta_streams_known") == 4


def test_known_streams_gauge_is_not_read_during_the_startup_scan(live_server, tmp_path, digit_images):
    """The startup scan fills the store's stream table in a worker thread: a /metrics scrape meanwhile must not
    iterate it (the known-streams gauge reads the table only once the scan is over), and counts them after."""
    import asyncio

    from prometheus_client.parser import text_string_to_metric_families

    from service.metrics import ServiceMetrics
    from service.store import StreamStore

    srv = live_server(settings_for(tmp_path / "s"))
    with srv.client() as c:
        for i in range(3):
            ok(c, f"k{i}", digit_images[:2])
    engine = srv.app.state.svc.store.engine
    srv.stop()  # the snapshots stay on disk

    def known(m: ServiceMetrics) -> float:
        return next(s.value for fam in text_string_to_metric_families(m.render()[0].decode())
                    for s in fam.samples if s.name == "tta_streams_known")

    metrics = ServiceMetrics()
    store = StreamStore(engine, tmp_path / "s", metrics=metrics, budget_bytes=10**9)
    seen: list[float] = []
    scan = store._scan

    def scan_and_scrape() -> None:  # a scrape while the worker thread scans (here: at its end, table filled)
        scan()
        seen.append(float(len(store._streams)))
        seen.append(known(metrics))  # 0: the gauge does not read the table the thread is filling

    store._scan = scan_and_scrape  # type: ignore[method-assign]

    async def run() -> float:
        await store.start()
        try:
            return known(metrics)
        finally:
            await store.close()

    after = asyncio.run(run())
    assert seen == [3.0, 0.0] and after == 3.0
