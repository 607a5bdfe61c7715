"""The adaptation service against a real uvicorn server on loopback (httpx), with the small bundled model."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    LiveServer,
    gated_engine,
    metric,
    npy_bytes,
    png_bytes,
    posting_threads,
    service_settings,
    service_test_model,
    wait_for,
)

from service.settings import ServiceSettings

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {"Content-Type": "application/x-npy"}


def settings_for(snapshot_dir: Path, **kw) -> ServiceSettings:
    return service_settings(snapshot_dir, **{"admin_token": TOKEN, "state_budget_bytes": 40_000, **kw})


def predict_npy(client, stream: str, images: np.ndarray) -> dict:
    r = client.post("/predict", content=npy_bytes(images), headers={**NPY, "X-Stream-Id": stream})
    assert r.status_code == 200, r.text
    return r.json()


def predict_png(client, stream: str, images: np.ndarray) -> dict:
    files = [("images", (f"{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(images)]
    r = client.post("/predict", files=files, headers={"X-Stream-Id": stream})
    assert r.status_code == 200, r.text
    return r.json()


def scores(resp: dict) -> list[list[float]]:
    """Everything numeric a prediction carries; exact comparison means identical logits in practice."""
    return [[p["label"], p["score"], p["entropy"], *[t["score"] for t in p["topk"]]] for p in resp["predictions"]]


def stream_info(client, stream: str) -> dict | None:
    r = client.get(f"/streams/{stream}", headers=AUTH)
    if r.status_code == 404:
        assert r.json()["error"]["code"] == "unknown_stream"
        return None
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------------ predict


def test_health_ready_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    spec = client.get("/openapi.json").json()
    content = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/x-npy"} <= set(content)
    params = {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert "X-Stream-Id" in params
    for path in ("/reset", "/streams", "/streams/{stream_id}", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"]


def test_multipart_and_npy_give_the_same_predictions(client, digit_images):
    x = digit_images[:8]
    a = predict_png(client, "mp", x)
    b = predict_npy(client, "np", x)
    for resp, sid in ((a, "mp"), (b, "np")):
        assert resp["stream_id"] == sid
        assert resp["step"] == 1 and resp["adapted"] is True and resp["skipped_reason"] is None
        assert resp["predictions_after_update"] is False
        assert 0.0 <= resp["batch_entropy"] <= 1.0
        assert len(resp["predictions"]) == 8
        for p in resp["predictions"]:
            assert isinstance(p["label"], int) and p["class_name"] == str(p["label"])
            top = [t["score"] for t in p["topk"]]
            assert len(top) == 5 and top == sorted(top, reverse=True) and top[0] == p["score"]
            assert p["topk"][0]["label"] == p["label"]
            assert p["entropy"] >= 0
    assert scores(a) == scores(b)  # PNG is lossless: both bodies are the same pixels, same source model


def test_predictions_are_those_of_the_source_model_before_the_update(client, digit_images):
    from mgg_core.data.sources import mnist5k

    src = mnist5k("test")
    idx = np.linspace(0, len(src) - 1, 16).astype(int)
    x = np.stack([src.get_image(int(i)) for i in idx])
    y = src.labels[idx]
    resp = predict_npy(client, "acc", x)
    labels = np.array([p["label"] for p in resp["predictions"]])
    assert (labels == y).mean() >= 0.8  # clean digits through the bundled source classifier


def test_reset_restores_source_predictions_exactly(client, digit_images):
    x, other = digit_images[:8], digit_images[8:16]
    first = predict_npy(client, "rs", x)
    for _ in range(3):
        predict_npy(client, "rs", other)
    adapted = predict_npy(client, "rs", x)
    assert adapted["step"] == 5
    assert scores(adapted) != scores(first), "adaptation should have changed the predictions"
    r = client.post("/reset", json={"stream_id": "rs"}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {"reset": ["rs"]}
    info = stream_info(client, "rs")
    assert info["step"] == 0
    again = predict_npy(client, "rs", x)
    assert again["step"] == 1
    assert scores(again) == scores(first)
    assert 'tta_resets_total{reason="request"}' in client.get("/metrics").text


def test_reset_all(client, digit_images):
    predict_npy(client, "ra1", digit_images[:4])
    predict_npy(client, "ra2", digit_images[:4])
    r = client.post("/reset", json={"all": True}, headers=AUTH)
    assert r.status_code == 200
    assert {"ra1", "ra2"} <= set(r.json()["reset"])
    assert stream_info(client, "ra1")["step"] == 0 and stream_info(client, "ra2")["step"] == 0


def test_streams_never_see_each_others_updates(client, digit_images):
    xs = [digit_images[i * 4:(i + 1) * 4] for i in range(4)]
    ys = [digit_images[16 + i * 4:16 + (i + 1) * 4] for i in range(4)]
    # reference: stream A's batches alone
    ref = [predict_npy(client, "iso-ref", x) for x in xs]
    # the same batches on A, interleaved with other batches on B
    got = []
    for x, y in zip(xs, ys, strict=False):
        got.append(predict_npy(client, "iso-a", x))
        predict_npy(client, "iso-b", y)
    assert [scores(r) for r in got] == [scores(r) for r in ref]
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # and a fresh stream still sees the source model
    src_a = predict_npy(client, "iso-fresh", xs[0])
    assert scores(src_a) == scores(ref[0])


def test_concurrent_requests_on_one_stream_are_serialised(client, server, digit_images):
    n = 8
    x, probe = digit_images[:8], digit_images[8:16]
    sequential = [predict_npy(client, "seq", x) for _ in range(n)]
    start = threading.Barrier(n)

    def one(_: int) -> dict:
        with server.client() as c:
            start.wait()
            return predict_npy(c, "conc", x)

    with ThreadPoolExecutor(n) as pool:
        concurrent = list(pool.map(one, range(n)))
    assert sorted(r["step"] for r in concurrent) == list(range(1, n + 1))
    by_step = {r["step"]: r for r in concurrent}
    for seq in sequential:  # the k-th update saw exactly the state after k-1 updates
        assert scores(by_step[seq["step"]]) == scores(seq)
    assert scores(predict_npy(client, "conc", probe)) == scores(predict_npy(client, "seq", probe))
    assert stream_info(client, "conc")["step"] == n + 1


def test_state_budget_evicts_to_disk_and_restores_exactly(client, server, digit_images):
    x = digit_images[:8]
    ref = [predict_npy(client, "bud-ref", x) for _ in range(2)]
    predict_npy(client, "bud-a", x)
    for sid in ("bud-b", "bud-c", "bud-d"):  # 40 kB budget holds two of these states
        predict_npy(client, sid, x)
    info = stream_info(client, "bud-a")
    assert info["resident"] is False and info["snapshot"] is True and info["step"] == 1
    assert (Path(server.settings.snapshot_dir) / "bud-a.safetensors").is_file()
    listing = client.get("/streams", headers=AUTH).json()
    assert listing["state_bytes"] <= listing["state_budget_bytes"]
    resumed = predict_npy(client, "bud-a", x)
    assert resumed["step"] == 2
    assert scores(resumed) == scores(ref[1])
    assert stream_info(client, "bud-a")["resident"] is True


def test_collapse_guard_rolls_back_and_says_so(client, digit_images):
    one_image = np.repeat(digit_images[:1], 8, axis=0)  # every prediction the same class: the share guard fires
    responses = [predict_npy(client, "collapse", one_image) for _ in range(20)]   # warm-up: 128 images
    rolled = [r for r in responses if r["rolled_back"]]
    assert rolled, "the collapse guard never fired"
    reason = rolled[0]["rollback_reason"]
    assert reason in ("class_collapse", "entropy_divergence")     # one repeated image: collapsed either way
    assert rolled[0]["step"] < responses[responses.index(rolled[0]) - 1]["step"] + 1
    assert all(r["rollback_reason"] is None for r in responses if not r["rolled_back"])
    assert stream_info(client, "collapse")["rollbacks"] == len(rolled)
    metrics = client.get("/metrics").text
    assert f'tta_rollbacks_total{{reason="{reason}"}}' in metrics


# ----------------------------------------------------------------------------------------- bad input


def multipart_body(parts: list[tuple[str, bytes]], boundary: str = "b0uNd") -> tuple[bytes, dict]:
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{n}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
        for n, data in parts
    ) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _bad_cases(digits: np.ndarray) -> dict[str, tuple[bytes, dict, int, str]]:
    png = png_bytes(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    ok = npy_bytes(digits[:2])
    return {
        "not_an_image": (*multipart_body([("a.txt", b"this is not an image")]), 400, "invalid_image"),
        "truncated_png": (*multipart_body([("cut.png", png[: len(png) // 2])]), 400, "invalid_image"),
        "one_bad_among_good": (*multipart_body([("ok.png", png), ("bad.png", b"\x89PNG...")]), 400, "invalid_image"),
        "empty_multipart": (*multipart_body([]), 400, "empty_batch"),
        "empty_npy": (npy_bytes(np.zeros((0, 28, 28), np.uint8)), NPY, 400, "empty_batch"),
        "too_many_images": (npy_bytes(np.zeros((17, 28, 28), np.uint8)), NPY, 413, "too_many_images"),
        "body_too_large": (npy_bytes(np.zeros((5, 128, 128, 3), np.uint8)), NPY, 413, "body_too_large"),
        "npy_float32": (npy_bytes(digits[:2].astype(np.float32)), NPY, 400, "invalid_npy_dtype"),
        "npy_2d": (npy_bytes(digits[0]), NPY, 400, "invalid_npy_shape"),
        "npy_5_channels": (npy_bytes(np.zeros((2, 8, 8, 5), np.uint8)), NPY, 400, "invalid_npy_shape"),
        "npy_short": (ok[:-7], NPY, 400, "invalid_npy"),
        "json_body": (b'{"images": []}', {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
    }


BAD_CASES = list(_bad_cases(np.zeros((4, 28, 28), np.uint8)))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_rejected_without_state_change(client, digit_images, case):
    body, headers, status, code = _bad_cases(digit_images)[case]
    sid = f"bad-{case}"
    predict_npy(client, sid, digit_images[:4])
    before = stream_info(client, sid)
    r = client.post("/predict", content=body, headers={**headers, "X-Stream-Id": sid})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and len(err["message"]) > 5
    after = stream_info(client, sid)
    assert (after["step"], after["requests"]) == (before["step"], before["requests"])
    # a stream never seen before is not created by a bad request
    r = client.post("/predict", content=body, headers={**headers, "X-Stream-Id": sid + "-new"})
    assert r.status_code == status
    assert stream_info(client, sid + "-new") is None
    assert predict_npy(client, sid, digit_images[:4])["step"] == before["step"] + 1


def test_body_limit_also_holds_without_content_length(client, digit_images):
    body = npy_bytes(np.zeros((5, 128, 128, 3), np.uint8))

    def chunks():  # chunked transfer: the limit is enforced while reading
        for i in range(0, len(body), 16384):
            yield body[i:i + 16384]

    r = client.post("/predict", content=chunks(), headers={**NPY, "X-Stream-Id": "chunked"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert stream_info(client, "chunked") is None


@pytest.mark.parametrize("bad_id", ["has/slash", "x" * 129, "", "spa ce", "ü".encode()])
def test_bad_stream_id(client, digit_images, bad_id):
    r = client.post("/predict", content=npy_bytes(digit_images[:2]), headers={**NPY, "X-Stream-Id": bad_id})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_stream_id"
    assert all(s["stream_id"] != bad_id for s in client.get("/streams", headers=AUTH).json()["streams"])


def test_stream_id_limits_accepted(client, digit_images):
    for sid in ("x" * 128, "a.b_c-D9", "."):
        assert predict_npy(client, sid, digit_images[:2])["stream_id"] == sid


def test_default_stream(client, digit_images):
    r = client.post("/predict", content=npy_bytes(digit_images[:2]), headers=NPY)
    assert r.status_code == 200 and r.json()["stream_id"] == "default"


def test_reset_errors(client, digit_images):
    r = client.post("/reset", json={"stream_id": "never-seen"}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_stream"
    r = client.post("/reset", json={}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.post("/reset", json={"stream_id": "bad/id"}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_stream_id"


def test_admin_endpoints_need_the_token(client, digit_images):
    predict_npy(client, "tok", digit_images[:4])
    predict_npy(client, "tok", digit_images[:4])
    calls = [
        ("POST", "/reset", {"json": {"stream_id": "tok"}}),
        ("POST", "/reset", {"json": {"all": True}}),
        ("GET", "/streams", {}),
        ("GET", "/streams/tok", {}),
        ("POST", "/streams/tok/snapshot", {}),
        ("DELETE", "/streams/tok", {}),
    ]
    for method, path, kw in calls:
        r = client.request(method, path, **kw)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
        r = client.request(method, path, headers={"Authorization": "Bearer wrong"}, **kw)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = client.request(method, path, headers={"Authorization": f"Basic {TOKEN}"}, **kw)
        assert r.status_code == 403
    assert stream_info(client, "tok")["step"] == 2  # none of the refused calls reset or deleted it
    r = client.delete("/streams/tok", headers=AUTH)
    assert r.status_code == 204
    assert stream_info(client, "tok") is None


def test_unknown_route_uses_the_error_body(client):
    r = client.get("/no-such-thing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/predict")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


# -------------------------------------------------------------------------------------------- metrics


def test_metrics(client, digit_images):
    from prometheus_client.parser import text_string_to_metric_families

    predict_npy(client, "met", digit_images[:4])
    predict_png(client, "met", digit_images[:3])
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("tta_images_total") >= 7
    assert value("tta_adaptation_steps_total") >= 2
    for phase in ("decode", "preprocess", "forward", "backward", "optimizer"):
        assert value("tta_phase_duration_seconds_count", phase=phase) >= 2, phase
    assert value("tta_batch_entropy_ratio_count") >= 2
    assert value("tta_http_request_duration_seconds_count", method="POST", route="/predict", status="200") >= 2
    assert value("tta_http_requests_total", method="POST", route="/predict", status="200") >= 2
    assert fams["tta_http_request_duration_seconds"].type == "histogram"
    assert value("tta_streams_active") >= 1 and value("tta_state_bytes") > 0
    build = [s for s in fams["tta_build_info"].samples]
    assert len(build) == 1 and build[0].value == 1 and build[0].labels["method"] == "tent"
    for name in ("tta_resets", "tta_rollbacks", "tta_snapshots", "tta_snapshot_restores", "tta_adaptation_skipped"):
        assert name in fams, name
    assert "tta_snapshot_duration_seconds" in fams
    labels = {k for f in fams.values() for s in f.samples for k in s.labels}
    assert not labels & {"stream", "stream_id"}  # no per-stream cardinality


def test_two_apps_have_independent_registries(tmp_path):
    from service.app import create_app

    a = create_app(settings_for(tmp_path / "a"))
    b = create_app(settings_for(tmp_path / "b"))
    ra, rb = a.state.svc.metrics.registry, b.state.svc.metrics.registry
    assert ra is not rb
    a.state.svc.metrics.images.inc(3)
    assert ra.get_sample_value("tta_images_total") == 3
    assert rb.get_sample_value("tta_images_total") == 0


# --------------------------------------------------------------------------------------- backpressure


def test_queue_bounds_answer_429_with_retry_after(live_server, tmp_path, digit_images):
    """A request takes its place in the stream's queue once its body has arrived; steps held at a gate keep the
    places taken, so a queue of size 1 (and a global queue of 2) fill deterministically."""
    srv = live_server(settings_for(tmp_path / "q", max_queue_per_stream=1, max_queue_total=2))
    body = npy_bytes(digit_images[:4])
    threads, results = posting_threads(srv, body, NPY, ["q0", "q1"])
    with gated_engine(srv) as gate, srv.client() as c:
        threads[0].start()
        wait_for(lambda: metric(c, "tta_queue_depth") == 1)
        r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": "q0"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "stream_queue_full"
        assert int(r.headers["retry-after"]) >= 1
        threads[1].start()
        wait_for(lambda: metric(c, "tta_queue_depth") == 2)
        r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": "q-other"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert "retry-after" in r.headers
        gate.set()
        for t in threads:
            t.join(60)
        assert all(results[s].status_code == 200 and results[s].json()["step"] == 1 for s in ("q0", "q1"))
        # the refused requests changed nothing; the queue is free again
        assert c.get("/streams/q-other", headers=AUTH).status_code == 404
        r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": "q0"})
        assert r.status_code == 200 and r.json()["step"] == 2
        assert 'tta_requests_rejected_total{queue="stream"} 1.0' in c.get("/metrics").text


# ------------------------------------------------------------------ idle eviction, post-update, bad snapshots


def test_idle_eviction_post_update_predictions_and_unreadable_snapshot(live_server, client, tmp_path, digit_images):
    snaps = tmp_path / "idle"
    snaps.mkdir()
    (snaps / "broken.safetensors").write_bytes(b"definitely not safetensors")
    srv = live_server(settings_for(snaps, idle_seconds=0.3, idle_check_seconds=0.1, return_post_update=True))
    x = digit_images[:8]
    # reference from the pre-update server: the 2nd pre-update answer on x is the post-update answer of the 1st
    ref = [predict_npy(client, "post-ref", x) for _ in range(2)]
    with srv.client() as c:
        got = predict_npy(c, "post", x)
        assert got["predictions_after_update"] is True and got["step"] == 1
        assert scores(got) == scores(ref[1])
        wait_for(lambda: stream_info(c, "post")["resident"] is False)  # idle: snapshotted and unloaded
        assert stream_info(c, "post")["snapshot"] is True and (snaps / "post.safetensors").is_file()
        again = predict_npy(c, "post", x)  # restored from disk on its next request
        assert again["step"] == 2
        assert 'tta_stream_evictions_total{reason="idle"}' in c.get("/metrics").text
        # a snapshot that cannot be read: a clear error, nothing silently reset; /reset starts it over
        assert stream_info(c, "broken")["snapshot"] is True
        r = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": "broken"})
        assert r.status_code == 500 and r.json()["error"]["code"] == "snapshot_restore_failed"
        assert (snaps / "broken.safetensors").is_file()
        assert c.post("/reset", json={"stream_id": "broken"}, headers=AUTH).status_code == 200
        assert not (snaps / "broken.safetensors").exists()
        assert predict_npy(c, "broken", x)["step"] == 1


# ----------------------------------------------------------------------------- the embedded default


def test_default_configuration_is_eata_and_mgg_is_one_switch_away(live_server, tmp_path, digit_images):
    """What `mgg serve` runs by default (here on the small bundled ResNet): EATA with SGD, the configuration the
    round-2 benchmark supports for long continual streams (docs/results.md); ``method="foa"`` alone gives FOA's loss
    with the MGG optimizer, its checkpoint pretrained for this classifier and FOA source statistics."""
    srv = live_server(ServiceSettings(_env_file=None, model=service_test_model(), device="cpu",
                                      snapshot_dir=tmp_path / "default", log_level="warning"))
    with srv.client() as c:
        info = c.get("/info").json()["model"]
        assert (info["method"], info["optimizer"]) == ("eata", "sgd")
        assert info["collapse_guard"] is True
        x = digit_images[:16]
        first = predict_npy(c, "d", x)
        # gradients are accumulated until update_images (64) images were seen, then EATA's SGD takes one step
        rest = [predict_npy(c, "d", x) for _ in range(3)]
        assert not first["adapted"] and first["skipped_reason"] == "accumulating"
        assert rest[-1]["adapted"] and rest[-1]["step"] == 1  # confident clean digits pass EATA's entropy filter
        assert first["loss"] is not None and 0 <= first["batch_entropy"] <= 1
        assert scores(predict_npy(c, "d", x)) != scores(first)  # the step moved the norm parameters
        assert c.post("/reset", json={"stream_id": "d"}).status_code == 200  # no admin token configured
        assert scores(predict_npy(c, "d", x)) == scores(first)
        stream = c.get("/streams/d").json()
        assert stream["bytes"] > 0 and stream["entropy_ema"] is not None
    mgg = live_server(ServiceSettings(_env_file=None, model=service_test_model(), device="cpu", method="foa",
                                      snapshot_dir=tmp_path / "mgg", log_level="warning"))
    with mgg.client() as c:
        info = c.get("/info").json()["model"]
        assert (info["method"], info["optimizer"]) == ("foa", "mgg")
        assert info["mgg_checkpoint"] and info["source_stats"]
        first = predict_npy(c, "d", x)
        rest = [predict_npy(c, "d", x) for _ in range(3)]
        assert rest[-1]["adapted"] and rest[-1]["step"] == 1
        assert scores(predict_npy(c, "d", x)) != scores(first)  # MGG moved the norm parameters


def test_a_model_that_cannot_load_keeps_the_server_live_but_not_ready(tmp_path):
    with pytest.raises(RuntimeError, match="model_load_failed") as info:
        LiveServer(settings_for(tmp_path / "s", model=str(tmp_path / "missing.safetensors")), ready_timeout=60)
    assert "missing.safetensors" in str(info.value) and "healthz 200" in str(info.value)
