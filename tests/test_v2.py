"""The Open Inference Protocol (KServe V2) endpoint against a live server on loopback, through the real client
``tritonclient[http]`` (and raw httpx for bodies that client cannot produce)."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from conftest import gated_engine, npy_bytes, service_settings

from service.settings import ServiceSettings

tc = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency (pip install -e .[dev])")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "v2-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL = "test_resnet"  # the bundled ResNet's card name: the default model name
OUTPUT_NAMES = ("probabilities", "labels", "entropy")


def settings_for(snapshot_dir, **kw) -> ServiceSettings:
    return service_settings(snapshot_dir, **{"admin_token": TOKEN, "max_body_bytes": 300_000,
                                             "max_image_pixels": 64 * 64, **kw})


@pytest.fixture(scope="module")
def http(client):
    return client  # the module's httpx client (conftest), named apart from the Triton one


@pytest.fixture(scope="module")
def triton(server):
    client = tc.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=120.0)
    yield client
    client.close()


def infer(triton, images, seq, *, binary=True, outputs=OUTPUT_NAMES, model=MODEL, version="", **kw):
    inp = tc.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=binary)
    outs = [tc.InferRequestedOutput(n, binary_data=binary) for n in outputs]
    return triton.infer(model, [inp], model_version=version, outputs=outs, sequence_id=seq, **kw)


def arrays(result) -> dict[str, np.ndarray]:
    return {n: result.as_numpy(n) for n in OUTPUT_NAMES}


def predict(http, stream, images) -> dict:
    r = http.post("/predict", content=npy_bytes(images), headers={"Content-Type": "application/x-npy",
                                                                    "X-Stream-Id": stream})
    assert r.status_code == 200, r.text
    return r.json()


def stream_step(http, sid: str) -> int | None:
    r = http.get(f"/streams/{sid}", headers=AUTH)
    return None if r.status_code == 404 else r.json()["step"]


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for n in OUTPUT_NAMES:
        assert a[n].dtype == b[n].dtype and a[n].shape == b[n].shape, n
        assert a[n].tobytes() == b[n].tobytes(), f"{n} differs"  # bit for bit


# ------------------------------------------------------------------------------------ health and metadata


def test_health_and_metadata(triton, http):
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "mgg-tta" and {"sequence", "binary_tensor_data"} <= set(meta["extensions"])
    assert triton.is_model_ready(MODEL) and triton.is_model_ready(MODEL, "1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready(MODEL, "2")
    m = triton.get_model_metadata(MODEL)
    assert m["name"] == MODEL and m["versions"] == ["1"]
    assert m["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
    assert m["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                            {"name": "labels", "datatype": "INT64", "shape": [-1]},
                            {"name": "entropy", "datatype": "FP32", "shape": [-1]}]
    assert triton.get_model_metadata(MODEL, "1") == m
    assert triton.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY"}]
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("nope")
    assert e.value.status() == "404" and "unknown model 'nope'" in e.value.message()
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}
    assert http.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert "/v2/models/{model_name}/infer" in http.get("/openapi.json").json()["paths"]


# ------------------------------------------------------------------------------------------ inference


def test_binary_and_json_tensors_give_identical_results(triton, http, digit_images):
    x, y = digit_images[:8], digit_images[8:16]
    for batch, step in ((x, 1), (y, 2)):  # two steps: the adapted states agree too
        b = infer(triton, batch, "tensors-bin", binary=True)
        j = infer(triton, batch, "tensors-json", binary=False)
        assert b.get_response()["parameters"]["step"] == j.get_response()["parameters"]["step"] == step
        assert all("parameters" in o for o in b.get_response()["outputs"])  # really binary ...
        assert all("data" in o for o in j.get_response()["outputs"])  # ... and really JSON
        assert_same(arrays(b), arrays(j))
    # nested JSON data (as the shape) and a 4-D [N, H, W, 1] input are the same tensor too
    body = {"parameters": {"sequence_id": "tensors-nested"},
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [8, 28, 28, 1],
                        "data": x[..., None].tolist()}]}
    r = http.post(f"/v2/models/{MODEL}/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json"), r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    first = arrays(infer(triton, x, "tensors-check"))
    assert np.array_equal(np.array(out["probabilities"]["data"], dtype=np.float32).reshape(8, 10),
                          first["probabilities"])
    assert out["labels"]["data"] == first["labels"].tolist()


def test_requested_outputs_only_and_response_parameters(triton, digit_images):
    res = infer(triton, digit_images[:4], 777, outputs=("labels",), request_id="req-1")
    resp = res.get_response()
    assert [o["name"] for o in resp["outputs"]] == ["labels"] and resp["id"] == "req-1"
    assert resp["model_name"] == MODEL and resp["model_version"] == "1"
    p = resp["parameters"]
    assert p["sequence_id"] == 777 and p["step"] == 1 and p["adapted"] is True and p["rolled_back"] is False
    assert "skipped_reason" not in p and res.as_numpy("labels").dtype == np.int64
    # no outputs listed: tritonclient asks for all of them, binary
    inp = tc.InferInput("images", [4, 28, 28], "UINT8")
    inp.set_data_from_numpy(digit_images[:4])
    res = triton.infer(MODEL, [inp], sequence_id=777)
    assert [o["name"] for o in res.get_response()["outputs"]] == list(OUTPUT_NAMES)
    assert res.get_response()["parameters"]["step"] == 2


def test_sequence_equals_predict_with_the_same_stream_history(triton, http, digit_images):
    """sequence_id is the stream: the same batches through /v2 and /predict give bit-identical numbers."""
    batches = [digit_images[:8], digit_images[8:16], digit_images[16:24], digit_images[:8]]
    v2 = [arrays(infer(triton, b, "same-v2")) for b in batches]
    v1 = [predict(http, "same-v1", b) for b in batches]
    for k, (a, p) in enumerate(zip(v2, v1, strict=True)):
        assert p["step"] == k + 1
        assert a["labels"].tolist() == [q["label"] for q in p["predictions"]]
        for row, q in enumerate(p["predictions"]):
            for t in q["topk"]:
                assert float(a["probabilities"][row, t["label"]]) == t["score"]  # float32 -> float: exact
            assert float(a["entropy"][row]) == q["entropy"]
    # it keeps adapting across calls: the same images are answered differently after three steps
    assert not np.array_equal(v2[3]["probabilities"], v2[0]["probabilities"])
    assert stream_step(http, "same-v2") == 4


def test_integer_sequence_id_is_the_stream_of_its_decimal_string(triton, http, digit_images):
    infer(triton, digit_images[:4], 4242)
    assert stream_step(http, "4242") == 1
    res = infer(triton, digit_images[:4], "4242")
    assert res.get_response()["parameters"]["step"] == 2


def test_sequence_start_restores_source_predictions_exactly(triton, http, digit_images):
    x, other = digit_images[:8], digit_images[8:16]
    first = arrays(infer(triton, x, "restart"))
    for _ in range(2):
        infer(triton, other, "restart")
    adapted = arrays(infer(triton, x, "restart"))
    assert not np.array_equal(adapted["probabilities"], first["probabilities"])
    again = infer(triton, x, "restart", sequence_start=True)
    assert again.get_response()["parameters"]["step"] == 1
    assert_same(arrays(again), first)
    assert 'tta_resets_total{reason="sequence_start"}' in http.get("/metrics").text


def test_sequence_end_snapshots_and_unloads_and_the_stream_continues(triton, http, digit_images):
    x, y = digit_images[:8], digit_images[8:16]
    infer(triton, x, "ending")
    end = infer(triton, y, "ending", sequence_end=True)
    assert end.get_response()["parameters"]["unloaded"] is True
    info = http.get("/streams/ending", headers=AUTH).json()
    assert info["resident"] is False and info["snapshot"] is True and info["step"] == 2
    # restored from its snapshot: the same as a stream that never left memory
    infer(triton, x, "staying")
    infer(triton, y, "staying")
    assert_same(arrays(infer(triton, x, "ending")), arrays(infer(triton, x, "staying")))


# --------------------------------------------------------------------------------------------- errors


def _raw(images: np.ndarray, **over) -> dict:
    tensor = {"name": "images", "datatype": "UINT8", "shape": list(images.shape), "data": images.ravel().tolist()}
    tensor.update(over.pop("tensor", {}))
    body = {"parameters": {"sequence_id": "bad"}, "inputs": [tensor]}
    body.update(over)
    return body


def _binary(images: np.ndarray, size: int | None = None, extra: bytes = b"") -> tuple[bytes, dict[str, str]]:
    head = json.dumps({"parameters": {"sequence_id": "bad"}, "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": list(images.shape),
         "parameters": {"binary_data_size": images.nbytes if size is None else size}}]}).encode()
    return head + images.tobytes() + extra, {"Inference-Header-Content-Length": str(len(head))}


X4 = np.zeros((4, 28, 28), dtype=np.uint8)
BAD_JSON = {
    "datatype": (_raw(X4, tensor={"datatype": "FP32"}), 400, "datatype 'FP32'"),
    "rank": (_raw(X4[0], tensor={}), 400, "must be [N, H, W] or [N, H, W, C]"),
    "channels": (_raw(np.zeros((2, 28, 28, 2), np.uint8)), 400, "channel dimension"),
    "input name": (_raw(X4, tensor={"name": "pixels"}), 400, "exactly one input 'images'"),
    "two inputs": ({**_raw(X4), "inputs": _raw(X4)["inputs"] * 2}, 400, "exactly one input"),
    "data shape": (_raw(X4, tensor={"shape": [4, 28, 27]}), 400, "does not fit shape"),
    "values": (_raw(X4, tensor={"data": [300] * X4.size}), 400, "0..255"),
    "floats": (_raw(X4, tensor={"data": [0.5] * X4.size}), 400, "integers 0..255"),
    "no sequence": (_raw(X4, parameters={}), 400, "sequence_id is missing"),
    "zero sequence": (_raw(X4, parameters={"sequence_id": 0, "sequence_start": True}), 400, "sequence_id is missing"),
    "bad sequence": (_raw(X4, parameters={"sequence_id": "no spaces"}), 400, "sequence_id 'no spaces' is invalid"),
    "negative sequence": (_raw(X4, parameters={"sequence_id": -3}), 400, "unsigned 64-bit"),
    "bool sequence": (_raw(X4, parameters={"sequence_id": True}), 400, "unsigned integer or a string"),
    "start not bool": (_raw(X4, parameters={"sequence_id": "bad", "sequence_start": "yes"}), 400, "true or false"),
    "unknown parameter": (_raw(X4, parameters={"sequence_id": "bad", "sequense_start": True}), 400, "sequense_start"),
    "unknown output": (_raw(X4, outputs=[{"name": "logits"}]), 400, "unknown output 'logits'"),
    "too many images": (_raw(np.zeros((17, 8, 8), np.uint8)), 413, "limit is 16"),
    "too many pixels": (_raw(np.zeros((1, 65, 64), np.uint8)), 413, "the limit is 4096"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_input_is_4xx_with_an_error_and_changes_nothing(http, digit_images, case):
    _ensure_bad_stream(http, digit_images)
    body, status, words = BAD_JSON[case]
    r = http.post(f"/v2/models/{MODEL}/infer", json=body)
    _check_refused(http, r, status, words)


BAD_BINARY = {
    "size mismatch": (lambda: _binary(X4, size=100), 400, "does not match shape"),
    "bytes missing": (lambda: _binary(X4, extra=b"\0"), 400, "bytes follow the JSON header"),
    "header length": (lambda: (_binary(X4)[0], {"Inference-Header-Content-Length": "99999999"}), 400,
                      "Inference-Header-Content-Length"),
    "not json": (lambda: (b"{nope" + X4.tobytes(), {"Inference-Header-Content-Length": "5"}), 400, "not valid JSON"),
    "gzip": (lambda: (_binary(X4)[0], {**_binary(X4)[1], "Content-Encoding": "gzip"}), 415, "Content-Encoding"),
    "body limit": (lambda: _binary(np.zeros((16, 140, 140), np.uint8)), 413, "exceeds the limit of 300000 bytes"),
}


@pytest.mark.parametrize("case", sorted(BAD_BINARY))
def test_bad_binary_input_is_4xx_with_an_error_and_changes_nothing(http, digit_images, case):
    _ensure_bad_stream(http, digit_images)
    make, status, words = BAD_BINARY[case]
    content, headers = make()
    r = http.post(f"/v2/models/{MODEL}/infer", content=content, headers=headers)
    _check_refused(http, r, status, words)


@pytest.mark.parametrize(("model", "version", "status", "words"), [
    ("nope", "", "404", "unknown model 'nope'"), (MODEL, "7", "404", "unknown version '7'"),
])
def test_unknown_model_or_version_through_the_client(triton, http, digit_images, model, version, status, words):
    _ensure_bad_stream(http, digit_images)
    with pytest.raises(InferenceServerException) as e:
        infer(triton, digit_images[:4], "bad", model=model, version=version)
    assert e.value.status() == status and words in e.value.message()
    assert stream_step(http, "bad") == 1


def test_no_sequence_id_through_the_client(triton, http, digit_images):
    with pytest.raises(InferenceServerException) as e:
        infer(triton, digit_images[:4], 0)
    assert e.value.status() == "400" and "sequence_id is missing" in e.value.message()


def test_refused_requests_left_the_stream_as_it_was(triton, http, digit_images):
    """After every refusal above, the stream continues exactly like one that never saw them."""
    _ensure_bad_stream(http, digit_images)
    infer(triton, digit_images[:8], "bad-control")
    assert_same(arrays(infer(triton, digit_images[8:16], "bad")), arrays(infer(triton, digit_images[8:16],
                                                                                 "bad-control")))


def _ensure_bad_stream(http, digit_images) -> None:
    if stream_step(http, "bad") is None:
        r = http.post(f"/v2/models/{MODEL}/infer", json=_raw(digit_images[:8]))
        assert r.status_code == 200, r.text
    assert stream_step(http, "bad") == 1


def _check_refused(http, r, status: int, words: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert words in body["error"], body["error"]
    assert stream_step(http, "bad") == 1  # nothing changed


# ------------------------------------------------------------------ backpressure, model name, metrics


def test_same_queue_429_with_retry_after_and_the_model_name_setting(live_server, tmp_path, digit_images):
    """A V2 request joins the very queue of /predict: a /predict step held at a gate keeps stream q's only place,
    so a V2 request on sequence q is a 429 with Retry-After (V2 error body); the model name comes from the setting."""
    import threading
    import time

    srv = live_server(settings_for(tmp_path / "q", max_queue_per_stream=1, model_name="digits"))
    done: dict = {}

    def send() -> None:
        with srv.client() as c:
            done["r"] = c.post("/predict", content=npy_bytes(digit_images[:4]),
                               headers={"Content-Type": "application/x-npy", "X-Stream-Id": "q"})

    t = threading.Thread(target=send)
    with gated_engine(srv) as gate, srv.client() as c:
        assert c.get("/v2/models/digits").json()["name"] == "digits"
        assert c.get(f"/v2/models/{MODEL}").status_code == 404
        t.start()
        deadline = time.monotonic() + 30
        while "tta_queue_depth 1.0" not in c.get("/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.post("/v2/models/digits/infer", json=_raw(digit_images[:4], parameters={"sequence_id": "q"}))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert list(r.json()) == ["error"] and "queued" in r.json()["error"]
        gate.set()
        t.join(60)
        assert done["r"].status_code == 200 and done["r"].json()["step"] == 1
        r = c.post("/v2/models/digits/infer", json=_raw(digit_images[:4], parameters={"sequence_id": "q"}))
        assert r.status_code == 200 and r.json()["parameters"]["step"] == 2
        metrics = c.get("/metrics").text
        assert 'tta_requests_rejected_total{queue="stream"} 1.0' in metrics
        assert "tta_images_total 8.0" in metrics  # both protocols count their images in one place
        assert 'route="/v2/models/{model_name}/infer",status="429"' in metrics  # templates: no names as labels


# ------------------------------------------------------------------------------- the load client's codec


def test_replay_encoder_writes_tritonclients_bytes_and_reads_the_server(triton, http, digit_images):
    from mgg_replay.v2 import decode_infer, encode_infer, infer_path

    x = digit_images[:6]
    inp = tc.InferInput("images", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    outs = [tc.InferRequestedOutput(n) for n in OUTPUT_NAMES]
    ref, ref_len = tc.InferenceServerClient.generate_request_body([inp], outputs=outs, sequence_id="codec",
                                                                  sequence_start=True)
    body, headers = encode_infer(x, "codec", start=True)
    assert body == ref and headers["Inference-Header-Content-Length"] == str(ref_len)
    r = http.post(infer_path(MODEL), content=body, headers=headers)
    assert r.status_code == 200, r.text
    doc, tensors = decode_infer(r.content, r.headers)
    theirs = tc.InferenceServerClient.parse_response_body(
        r.content, header_length=int(r.headers["Inference-Header-Content-Length"]))
    assert doc["parameters"]["step"] == 1
    for n in OUTPUT_NAMES:
        assert tensors[n].tobytes() == theirs.as_numpy(n).tobytes()


def test_replay_through_v2_equals_replay_through_predict(server, tmp_path):
    """`mgg replay --protocol v2` replays the same seeded streams as /predict and counts the same correct answers,
    stream by stream (the same engine on the same batches: the protocols differ only in transport)."""
    import argparse

    import mgg_replay as rp

    def run(protocol: str, prefix: str) -> dict:
        ap = argparse.ArgumentParser()
        rp.add_parser(ap.add_subparsers())
        args = ap.parse_args(["replay", "--url", server.url, "--streams", "2", "--images-per-domain", "32",
                              "--batch-size", "16", "--corruptions", "fog,pixelate", "--protocol", protocol,
                              "--stream-prefix", prefix, "--token", TOKEN, "--out", str(tmp_path / protocol),
                              "--no-progress"])
        args.argv = []
        assert rp.main(args) == 0
        return json.loads((tmp_path / protocol / "replay.json").read_text())

    v2, v1 = run("v2", "rv2"), run("predict", "rv1")
    assert v2["protocol"]["transport"]["protocol"] == "v2" and v2["protocol"]["transport"]["model_name"] == MODEL
    assert [r["via"] for r in v2["resets"]] == ["sequence_start"] * 2 and all(r["status"] == 200 for r in v2["resets"])
    s2, s1 = v2["summary"], v1["summary"]
    assert s2["images_answered"] == s1["images_answered"] == 2 * 64 and s2["errors"]["failed_requests"] == 0

    def per_request(report: dict, sid: str) -> list[tuple[int, int, int]]:
        return sorted((r["seq"], r["step"], r["correct"]) for r in report["requests"]
                      if r["final"] and r["stream_id"] == sid)

    for k in ("0", "1"):
        a, b = per_request(v2, f"rv2-{k}"), per_request(v1, f"rv1-{k}")
        assert a == b and [step for _, step, _ in a] == [1, 2, 3, 4]
    assert s2["correct"] == s1["correct"]


def test_a_server_that_cannot_load_its_model_is_live_but_not_ready_on_v2(tmp_path, digit_images):
    """Live, not ready: /v2/health/ready and the model calls answer 503 with the V2 error body."""
    import socket
    import threading

    import httpx
    import uvicorn

    from service.app import create_app

    app = create_app(settings_for(tmp_path / "s", model=str(tmp_path / "missing.safetensors"), model_name="m"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(300):
                try:
                    if "model_load_failed" in c.get("/readyz").text:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.1)
            assert c.get("/v2/health/live").json() == {"live": True}
            r = c.get("/v2/health/ready")
            assert r.status_code == 503 and r.json()["ready"] is False
            assert c.get("/v2/models/m/ready").status_code == 503
            assert c.get("/v2/models/other/ready").status_code == 404
            r = c.post("/v2/models/m/infer", json=_raw(digit_images[:2]))
            assert r.status_code == 503 and list(r.json()) == ["error"] and isinstance(r.json()["error"], str)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# ------------------------------------------------------------------------------------ codec, no server


def test_codec_sequence_ids_header_length_and_tensor_layouts():
    from service.v2.codec import V2Error, header_length, input_as_npy, parse_header, sequence_stream

    assert sequence_stream(2**64 - 1) == (2**64 - 1, str(2**64 - 1))
    assert sequence_stream(0) is None and sequence_stream("") is None and sequence_stream(None) is None
    for bad in (2**64, -1, True, 1.5, "a b", "x" * 129, ["1"]):
        with pytest.raises(V2Error) as e:
            sequence_stream(bad)
        assert e.value.status == 400
    assert header_length(None) is None and header_length(" 12 ", 20) == 12
    for bad in ("x", "0", "-4", "21"):
        with pytest.raises(V2Error):
            header_length(bad, 20)
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    flat = parse_header(json.dumps({"parameters": {"sequence_id": 1}, "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [2, 3, 4], "data": x.ravel().tolist()}]}).encode(), 0)
    nested = parse_header(json.dumps({"parameters": {"sequence_id": 1}, "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [2, 3, 4], "data": x.tolist()}]}).encode(), 0)
    binary = parse_header(json.dumps({"parameters": {"sequence_id": 1}, "inputs": [
        {"name": "images", "datatype": "UINT8", "shape": [2, 3, 4],
         "parameters": {"binary_data_size": 24}}]}).encode(), 24)
    arrays = [np.load(io.BytesIO(input_as_npy(r, x.tobytes()))) for r in (flat, nested, binary)]
    for a in arrays:
        assert a.dtype == np.uint8 and np.array_equal(a, x)
    assert flat.outputs == [("probabilities", False), ("labels", False), ("entropy", False)]


def test_v2_answers_after_the_update_with_return_post_update(live_server, tmp_path, triton, digit_images):
    """return_post_update on /v2: the answer is the model after the step (the module server answers before it:
    its 2nd answer on the same images is the post-update server's 1st), labels and entropies with it."""
    x = digit_images[:8]
    ref = [arrays(infer(triton, x, "post-ref")) for _ in range(2)]
    srv = live_server(settings_for(tmp_path / "post", return_post_update=True))
    client = tc.InferenceServerClient(url=srv.url.removeprefix("http://"), network_timeout=120.0)
    try:
        got = infer(client, x, "post")
        assert got.get_response()["parameters"]["predictions_after_update"] is True
        assert_same(arrays(got), ref[1])
        assert not np.array_equal(ref[1]["probabilities"], ref[0]["probabilities"])  # the step changed them
    finally:
        client.close()
