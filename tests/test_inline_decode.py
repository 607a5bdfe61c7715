"""``inline_max_pixels``: a small request is decoded and preprocessed on the event loop, a larger one in worker
threads; the limit is exact (pixels, and a body of at most 4 bytes per pixel), 0 turns it off, and the answer is
the same either way. Live server on loopback; bounded."""
from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from conftest import npy_bytes, png_bytes, service_settings

import service.dataplane as dataplane
from service.decode import ProbedBody

PIXELS4 = 4 * 28 * 28  # four digits
INPUTS4 = 4 * 32 * 32  # as the bundled model's inputs


def on_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


@pytest.fixture
def calls(monkeypatch):
    """Where each stage ran: (stage, on the event loop?) in order."""
    seen: list[tuple[str, bool]] = []

    def wrap(name, fn):
        def wrapped(*args, **kw):
            seen.append((name, on_loop()))
            return fn(*args, **kw)
        return wrapped

    monkeypatch.setattr(dataplane, "decode_body", wrap("decode_body", dataplane.decode_body))
    monkeypatch.setattr(dataplane, "probe_body", wrap("probe_body", dataplane.probe_body))
    monkeypatch.setattr(ProbedBody, "decode", wrap("decode", ProbedBody.decode))
    return seen


def serve(live_server, tmp: Path, calls: list, **kw):
    srv = live_server(service_settings(tmp, **kw))
    rt = srv.app.state.svc.runtime
    real = rt.preprocessor

    def preprocess(images):
        calls.append(("preprocess", on_loop()))
        return real(images)

    rt.preprocessor = preprocess
    return srv


def post(srv, body: bytes, ctype: str, sid: str) -> dict:
    with srv.client() as c:
        r = c.post("/predict", content=body, headers={"Content-Type": ctype, "X-Stream-Id": sid})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("limit, expected", [
    (None, [("probe_body", True), ("decode", True), ("preprocess", True)]),  # the default, 16384
    (INPUTS4, [("probe_body", True), ("decode", True), ("preprocess", True)]),  # at the limit (model inputs)
    (PIXELS4 - 1, [("probe_body", True), ("decode", False), ("preprocess", False)]),  # one pixel over
    (0, [("decode_body", False), ("decode", False), ("preprocess", False)]),  # off
    (300, [("decode_body", False), ("decode", False), ("preprocess", False)]),  # body over 4 bytes per pixel
])
def test_where_a_request_is_decoded_and_preprocessed(live_server, tmp_path, digit_images, calls, limit, expected):
    kw = {} if limit is None else {"inline_max_pixels": limit}
    srv = serve(live_server, tmp_path / "s", calls, **kw)
    assert srv.app.state.svc.settings.inline_max_pixels == (16384 if limit is None else limit)
    calls.clear()
    post(srv, npy_bytes(digit_images[:4]), "application/x-npy", "a")
    assert calls == expected


def test_multipart_images_are_probed_before_they_are_decoded_inline(live_server, tmp_path, digit_images, calls):
    from test_service_decode import multipart  # the test module's multipart builder

    srv = serve(live_server, tmp_path / "s", calls)
    body, ctype = multipart([("images", f"{i}.png", png_bytes(im)) for i, im in enumerate(digit_images[:4])])
    calls.clear()
    post(srv, body, ctype, "a")
    assert calls == [("probe_body", True), ("decode", True), ("preprocess", True)]


def test_the_answer_does_not_depend_on_where_it_was_decoded(live_server, tmp_path, digit_images, calls):
    answers = []
    for limit in (16384, 0):
        srv = serve(live_server, tmp_path / f"s{limit}", calls, inline_max_pixels=limit)
        answers.append([post(srv, npy_bytes(digit_images[i:i + 4]), "application/x-npy", "a")["predictions"]
                        for i in range(0, 16, 4)])
        srv.stop()
    assert answers[0] == answers[1]
    assert np.isfinite([p["score"] for preds in answers[0] for p in preds]).all()


def test_bad_input_is_refused_the_same_way_inline(live_server, tmp_path, calls):
    srv = serve(live_server, tmp_path / "s", calls)
    with srv.client() as c:
        r = c.post("/predict", content=b"\x93NUMPY garbage", headers={"Content-Type": "application/x-npy"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_npy", r.text
        r = c.post("/predict", content=b"{}", headers={"Content-Type": "application/json"})
        assert r.status_code == 415
        assert c.get("/streams").json()["streams"] == []  # nothing changed


def test_a_small_image_for_a_larger_model_input_is_preprocessed_in_a_thread(live_server, tmp_path, digit_images,
                                                                             calls):
    """The preprocessing work is the model's input size when the image is smaller (it is resized up): 4 digits of
    28 x 28 (3136 px) become 4 inputs of 32 x 32 (4096 px), so a limit between the two decodes on the event loop and
    preprocesses in a worker thread."""
    srv = serve(live_server, tmp_path / "s", calls, inline_max_pixels=PIXELS4 + 100)
    assert tuple(srv.app.state.svc.runtime.input_size[-2:]) == (32, 32)
    calls.clear()
    post(srv, npy_bytes(digit_images[:4]), "application/x-npy", "a")
    assert calls == [("probe_body", True), ("decode", True), ("preprocess", False)]
