"""Idempotent requests (service/idempotency.py): a retry with the same ``Idempotency-Key`` is answered from the stored
answer and does not step the stream again, on /predict and /v2, after a hang-up and after kill -9; the key and byte
bounds hold at their limits. Loopback only, bounded."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import npy_bytes, png_bytes, service_settings, service_test_model

from mgg_core.state import StreamState
from mgg_replay.server import ServerProcess, kill9_restart, serve_command
from service.idempotency import ANNOTATION, Answer, AnswerBook, record_size

TOKEN = "idem-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {"Content-Type": "application/x-npy"}
MODEL = "test_resnet"


def settings(snapshot_dir: Path, **kw):
    """The loopback test settings (conftest.service_settings) with this module's admin token."""
    return service_settings(snapshot_dir, **{"admin_token": TOKEN, **kw})


def settings_for(snapshot_dir: Path):
    """The module's server (conftest's ``server`` fixture): 3 keys kept per stream."""
    return settings(snapshot_dir, idempotency_keys=3)


def post(c: httpx.Client, sid: str, x: np.ndarray, key: str | None = None) -> httpx.Response:
    headers = {**NPY, "X-Stream-Id": sid, **({"Idempotency-Key": key} if key is not None else {})}
    return c.post("/predict", content=npy_bytes(x), headers=headers)


def step_of(c: httpx.Client, sid: str) -> int | None:
    r = c.get(f"/streams/{sid}", headers=AUTH)
    return None if r.status_code == 404 else r.json()["step"]


def requests_of(c: httpx.Client, sid: str) -> int:
    return c.get(f"/streams/{sid}", headers=AUTH).json()["requests"]


def replays(c: httpx.Client) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith("tta_idempotent_replays_total "):
            return float(line.split()[1])
    raise AssertionError("no replay counter")


# ------------------------------------------------------------------------------------------- /predict


def test_retry_is_replayed_byte_for_byte_without_a_step(client, digit_images):
    x, y = digit_images[:4], digit_images[4:8]
    n0 = replays(client)
    first = post(client, "r1", x, "k-1")
    assert first.status_code == 200 and first.headers["Idempotent-Replayed"] == "false"
    assert first.headers["Idempotency-Key"] == "k-1" and first.json()["step"] == 1
    again = post(client, "r1", x, "k-1")
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content  # the stored answer, timings included
    assert step_of(client, "r1") == 1 and replays(client) == n0 + 1
    # a new key steps; so does a request without a key
    assert post(client, "r1", y, "k-2").json()["step"] == 2
    assert post(client, "r1", y).json()["step"] == 3
    # the same key on another stream is another request
    assert post(client, "r2", x, "k-1").headers["Idempotent-Replayed"] == "false"
    assert step_of(client, "r2") == 1


def test_keyed_answer_equals_the_unkeyed_one(client, digit_images):
    x = digit_images[8:12]
    keyed = post(client, "eq-a", x, "eq").json()
    plain = post(client, "eq-b", x).json()
    for d in (keyed, plain):
        d.pop("timings")
        d.pop("stream_id")
    assert keyed == plain


def test_multipart_retry_with_a_new_boundary_is_the_same_request(client, digit_images):
    files = [("images", (f"{i}.png", png_bytes(a), "image/png")) for i, a in enumerate(digit_images[:3])]
    h = {"X-Stream-Id": "mp", "Idempotency-Key": "mp-1"}
    a = client.post("/predict", files=files, headers=h)  # httpx draws a new random boundary per request
    b = client.post("/predict", files=files, headers=h)
    assert a.request.headers["content-type"] != b.request.headers["content-type"]
    assert a.status_code == b.status_code == 200 and b.headers["Idempotent-Replayed"] == "true"
    assert a.content == b.content and step_of(client, "mp") == 1


def test_reused_key_with_other_images_is_422_and_changes_nothing(client, digit_images):
    x, y, probe = digit_images[:4], digit_images[4:8], digit_images[16:20]
    assert post(client, "reuse", x, "same").status_code == 200
    assert post(client, "twin", x).status_code == 200
    before = requests_of(client, "reuse")
    r = post(client, "reuse", y, "same")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
    assert "same" in r.json()["error"]["message"]
    assert step_of(client, "reuse") == 1 and requests_of(client, "reuse") == before
    # the state is untouched: the next step predicts exactly as a twin that never saw the refused request
    a, b = post(client, "reuse", probe).json(), post(client, "twin", probe).json()
    assert a["step"] == b["step"] == 2 and a["predictions"] == b["predictions"]


def info_of(c: httpx.Client, sid: str) -> dict:
    return c.get(f"/streams/{sid}", headers=AUTH).json()


@pytest.mark.parametrize("durability", ["step", "interval"])
def test_replay_and_reused_key_leave_the_stream_as_it_was(live_server, tmp_path, digit_images, durability):
    """A replay or a 422 refuses before anything changes: the resident state is not dropped (no restore from disk),
    and nothing is counted as a request or as an unpersisted step."""
    srv = live_server(settings(tmp_path, durability=durability, snapshot_interval_steps=1000))
    x, y = digit_images[:4], digit_images[4:8]
    with srv.client() as c:
        assert post(c, "as-was", x, "k").status_code == 200
        before = info_of(c, "as-was")
        assert before["resident"] and before["unpersisted_steps"] == (durability == "interval")
        restores = srv.app.state.svc.metrics.snapshot_restores._value.get()
        assert post(c, "as-was", x, "k").headers["Idempotent-Replayed"] == "true"
        assert post(c, "as-was", y, "k").status_code == 422
        after = info_of(c, "as-was")
        assert {k: after[k] for k in ("step", "resident", "requests", "unpersisted_steps")} == \
            {k: before[k] for k in ("step", "resident", "requests", "unpersisted_steps")}
        assert srv.app.state.svc.metrics.snapshot_restores._value.get() == restores


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "caf\u00e9"])
def test_invalid_key_is_400_and_changes_nothing(client, digit_images, key):
    headers = {**NPY, "X-Stream-Id": "badkey"}
    r = client.post("/predict", content=npy_bytes(digit_images[:2]),
                    headers=[*headers.items(), ("Idempotency-Key", key.encode("utf-8"))])
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key", r.text
    assert step_of(client, "badkey") is None


def test_concurrent_duplicates_step_once(client, digit_images):
    x = digit_images[:8]
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda _: post(client, "conc", x, "c-1"), range(4)))
    assert [r.status_code for r in rs] == [200] * 4
    assert sorted(r.headers["Idempotent-Replayed"] for r in rs) == ["false", "true", "true", "true"]
    assert len({r.content for r in rs}) == 1 and step_of(client, "conc") == 1


def test_hang_up_after_the_body_then_retry_steps_once(server, client, digit_images, monkeypatch):
    engine = server.app.state.svc.runtime.engine
    step, release = engine.step, threading.Event()

    def held_step(state, x):  # holds the step until the client has hung up
        assert release.wait(60)
        return step(state, x)

    monkeypatch.setattr(engine, "step", held_step)
    body = npy_bytes(digit_images[:8])
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-npy\r\n"
            f"X-Stream-Id: hang\r\nIdempotency-Key: h-1\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        deadline = time.monotonic() + 60
        while (client.get("/streams/hang", headers=AUTH).json() or {}).get("pending") != 1:
            assert time.monotonic() < deadline  # the body has arrived and its step is running
            time.sleep(0.02)
    # the client went away before its answer; the step is applied all the same (the job owns the ticket)
    release.set()
    while step_of(client, "hang") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    monkeypatch.setattr(engine, "step", step)
    r = post(client, "hang", digit_images[:8], "h-1")  # the retry: answered, not stepped again
    assert r.status_code == 200 and r.headers["Idempotent-Replayed"] == "true" and r.json()["step"] == 1
    assert step_of(client, "hang") == 1


def test_key_count_limit_forgets_the_oldest(client, digit_images):
    x = [digit_images[i:i + 2] for i in range(0, 8, 2)]
    for i in range(4):  # idempotency_keys=3: the 4th key pushes the 1st out
        assert post(client, "lim", x[i], f"n{i}").headers["Idempotent-Replayed"] == "false"
    for i in (1, 2, 3):
        assert post(client, "lim", x[i], f"n{i}").headers["Idempotent-Replayed"] == "true"
    assert step_of(client, "lim") == 4
    r = post(client, "lim", x[0], "n0")  # forgotten: a new request again
    assert r.headers["Idempotent-Replayed"] == "false" and r.json()["step"] == 5


def test_reset_forgets_the_keys(client, digit_images):
    x = digit_images[:2]
    assert post(client, "rs", x, "r").json()["step"] == 1
    assert client.post("/reset", json={"stream_id": "rs"}, headers=AUTH).status_code == 200
    r = post(client, "rs", x, "r")
    assert r.headers["Idempotent-Replayed"] == "false" and r.json()["step"] == 1


# -------------------------------------------------------------------------------------------- byte cap


def _answer(n: int) -> Answer:
    return Answer(200, "application/json", bytes(n))


def _book_records(book: AnswerBook, n_bodies: list[int]) -> list[str]:
    state = StreamState(tensors={}, fingerprint={})
    for i, n in enumerate(n_bodies):
        book.remember(state, "s", f"k{i}", "f" * 64, i, _answer(n))
    raw = state.annotations[ANNOTATION]
    assert len(raw) <= book.max_bytes
    return [r["key"] for r in json.loads(raw)]


def test_byte_cap_holds_at_its_limit():
    rec = {"key": "k0", "fp": "f" * 64, "step": 0, "status": 200, "type": "application/json", "headers": {},
           "body": "A" * 400}  # 300 bytes of body in base64
    size = record_size(rec)
    exact = 2 * size + 3  # two records in a JSON list: brackets and one comma
    assert _book_records(AnswerBook(10, exact), [300, 300]) == ["k0", "k1"]
    assert _book_records(AnswerBook(10, exact - 1), [300, 300]) == ["k1"]  # one byte less: the oldest goes
    # an answer larger than the cap alone keeps its key without its body: a retry is refused, not stepped
    book = AnswerBook(10, 1024)
    state = StreamState(tensors={}, fingerprint={})
    assert book.remember(state, "s", "small", "a", 1, _answer(10))
    assert not book.remember(state, "s", "big", "b", 2, _answer(5000))
    assert len(state.annotations[ANNOTATION]) <= 1024
    assert book.lookup(state, "s", "small", "a") == _answer(10)
    from service.errors import ApiError

    with pytest.raises(ApiError) as e:
        book.lookup(state, "s", "big", "b")
    assert e.value.status == 409 and e.value.code == "idempotent_answer_not_kept"


def test_byte_cap_over_http(live_server, tmp_path, digit_images):
    snaps = tmp_path / "s"
    srv = live_server(settings(snaps, idempotency_max_bytes=4096, topk=5))
    with srv.client() as c:
        assert post(c, "cap", digit_images[:16], "big").status_code == 200  # ~8 KB answer: not kept
        assert post(c, "cap", digit_images[16:17], "small").status_code == 200  # ~1.3 KB: kept
        r = post(c, "cap", digit_images[:16], "big")
        assert r.status_code == 409 and r.json()["error"]["code"] == "idempotent_answer_not_kept", r.text
        r = post(c, "cap", digit_images[16:17], "small")
        assert r.headers.get("Idempotent-Replayed") == "true", r.text
        assert step_of(c, "cap") == 2
    from safetensors import safe_open

    with safe_open(str(snaps / "cap.safetensors"), framework="pt") as f:
        raw = json.loads(f.metadata()["annotations"])[ANNOTATION]
    assert len(raw) <= 4096 and [r["key"] for r in json.loads(raw)] == ["big", "small"]


# ------------------------------------------------------------------------------------------------ /v2


def v2_body(images: np.ndarray, seq: str, **params) -> dict:
    return {"parameters": {"sequence_id": seq, **params},
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                        "data": images.ravel().tolist()}]}


def test_v2_retry_is_replayed(client, digit_images):
    x = digit_images[:2]
    h = {"Idempotency-Key": "v-1"}
    a = client.post(f"/v2/models/{MODEL}/infer", json=v2_body(x, "v2s"), headers=h)
    b = client.post(f"/v2/models/{MODEL}/infer", json=v2_body(x, "v2s"), headers=h)
    assert a.status_code == b.status_code == 200, a.text
    assert (a.headers["Idempotent-Replayed"], b.headers["Idempotent-Replayed"]) == ("false", "true")
    assert a.content == b.content and a.json()["parameters"]["step"] == 1 and step_of(client, "v2s") == 1
    c = client.post(f"/v2/models/{MODEL}/infer", json=v2_body(x, "v2s", sequence_start=True), headers=h)
    assert c.status_code == 422 and "different request" in c.json()["error"]  # V2 error shape
    assert step_of(client, "v2s") == 1


def test_v2_request_id_as_key_is_opt_in(live_server, tmp_path, digit_images):
    x = digit_images[:2]
    body = {**v2_body(x, "ids"), "id": "req-7"}
    srv = live_server(settings(tmp_path / "s", idempotency_v2_request_id=True))
    with srv.client() as c:
        a = c.post(f"/v2/models/{MODEL}/infer", json=body)
        b = c.post(f"/v2/models/{MODEL}/infer", json=body)
        assert b.headers["Idempotent-Replayed"] == "true" and a.content == b.content and step_of(c, "ids") == 1


def test_v2_request_id_is_not_a_key_by_default(client, digit_images):
    body = {**v2_body(digit_images[:2], "ids-off"), "id": "req-7"}
    for _ in range(2):
        assert "Idempotent-Replayed" not in client.post(f"/v2/models/{MODEL}/infer", json=body).headers
    assert step_of(client, "ids-off") == 2


# ------------------------------------------------------------------------------------------- kill -9


@pytest.mark.timeout(600)
@pytest.mark.parametrize("durability", ["step", "interval"])
def test_retry_after_kill_9(tmp_path, digit_images, durability):
    """'step': the acknowledged request and its answer survive together, the retry is replayed. 'interval' (nothing
    written before the crash): the step is lost with its answer, so the retry steps once on the restored state."""
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    flags = ["--model", service_test_model(), "--device", "cpu", "--snapshot-dir", str(snaps), "--log-level",
             "warning", "--method", "tent", "--optimizer", "sgd", "--lr", "0.05", "--torch-threads", "1",
             "--admin-token", TOKEN, "--durability", durability]
    env = {"MGG_UPDATE_IMAGES": "1", "MGG_BN_STATS": "batch", "MGG_GUARD_CHECK_SHARE": "0",
           "MGG_SNAPSHOT_INTERVAL_STEPS": "1000", "MGG_SNAPSHOT_INTERVAL_SECONDS": "3600"}
    x = digit_images[:4]

    def start() -> ServerProcess:
        return ServerProcess(lambda port: serve_command(port, *flags), env, cwd=tmp_path).start()

    def before(c: httpx.Client) -> bytes:
        r = post(c, "crash", x, "kk")
        assert r.status_code == 200 and r.json()["step"] == 1
        return r.content

    def after(c: httpx.Client, acked: bytes) -> None:
        r = post(c, "crash", x, "kk")
        assert r.status_code == 200 and r.json()["step"] == 1 and step_of(c, "crash") == 1
        if durability == "step":
            assert r.headers["Idempotent-Replayed"] == "true" and r.content == acked
        else:
            assert r.headers["Idempotent-Replayed"] == "false"
            assert json.loads(acked)["predictions"] == r.json()["predictions"]  # the same step, taken once

    kill9_restart(start, before, after, timeout=60)


def test_openapi_and_info_document_it(client):
    params = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["parameters"]
    assert "Idempotency-Key" in {p["name"] for p in params}
    limits = client.get("/info").json()["limits"]
    assert limits["idempotency_keys"] == 3 and limits["idempotency_max_bytes"] == 256 * 1024


def test_settings_bounds():
    from pydantic import ValidationError

    for bad in ({"idempotency_keys": 0}, {"idempotency_max_bytes": 1023}, {"idempotency_max_bytes": 2 * 1024**2}):
        with pytest.raises(ValidationError):
            settings(Path("x"), **bad)


def test_unreadable_records_refuse_keyed_requests_only(tmp_path):
    from service.errors import ApiError

    state = StreamState(tensors={}, fingerprint={}, annotations={ANNOTATION: "{not json"})
    with pytest.raises(ApiError) as e:
        AnswerBook(4, 4096).lookup(state, "s", "k", "f")
    assert e.value.status == 500 and e.value.code == "snapshot_restore_failed" and "POST /reset" in e.value.message
    # a snapshot whose annotations are not a mapping of strings is not a readable snapshot at all
    import torch

    good = StreamState(tensors={"theta": torch.zeros(2)}, fingerprint={}, annotations={ANNOTATION: "[]"})
    good.save(tmp_path / "a.safetensors")
    assert StreamState.load(tmp_path / "a.safetensors").annotations == {ANNOTATION: "[]"}
    from safetensors.torch import load_file, save_file

    meta = {"format": "1", "scalars": json.dumps({"step": 0}), "fingerprint": "{}", "annotations": "[1, 2]"}
    save_file({k: v for k, v in load_file(tmp_path / "a.safetensors").items()}, tmp_path / "b.safetensors",
              metadata=meta)
    with pytest.raises(ValueError, match="annotations"):
        StreamState.load(tmp_path / "b.safetensors")
