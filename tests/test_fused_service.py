"""Fused steps through HTTP (issue 10, service part): streams sending concurrently through /predict and V2 get what
they would get alone, in their own order, with fused steps really happening; a failed durable write in a fused
step fails only its own stream; the fused-step settings reach the scheduler.

Loopback only (LiveServer), bounded (every thread join and wait has a timeout). The reference is the same engine
in-process, each stream stepped alone (``engine.step``), in order.
"""
from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import gated_engine, metric, npy_bytes, posting_threads, service_test_model, wait_for

from mgg_replay.v2 import decode_infer, encode_infer, infer_path
from service.settings import ServiceSettings

TOKEN = "fused-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NPY = {"Content-Type": "application/x-npy"}
MODEL = "test_resnet"  # the bundled ResNet's card name (the V2 model name)


def settings_for(snapshot_dir: Path, **kw) -> ServiceSettings:
    base = dict(
        model=service_test_model(), device="cpu", snapshot_dir=snapshot_dir, max_images=16, max_body_bytes=300_000,
        admin_token=TOKEN, idle_seconds=600, log_level="warning", fused_steps=True,
        # one fused call at a time: requests arriving while it runs queue up for the next one
        max_concurrent_streams=1, max_batch_delay_ms=200.0,
    )
    base.update(kw)
    return ServiceSettings(_env_file=None, **base)


def softmax(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.float(), dim=1).numpy()


class Reference:
    """Each stream stepped alone, in order, on the server's own engine (same weights, settings and preprocessor)."""

    def __init__(self, srv) -> None:
        rt = srv.app.state.svc.runtime
        self.engine, self.pre = rt.engine, rt.preprocessor
        self.states: dict[str, object] = {}

    def step(self, sid: str, images: np.ndarray, reset: bool = False) -> np.ndarray:
        state = self.states.setdefault(sid, self.engine.new_state())
        if reset:
            self.engine.reset(state)
        return softmax(self.engine.step(state, self.pre(images)).logits)


def send_predict(c: httpx.Client, sid: str, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    r = c.post("/predict", content=npy_bytes(images), headers={**NPY, "X-Stream-Id": sid})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    probs = np.array([[t["score"] for t in sorted(p["topk"], key=lambda t: t["label"])] for p in preds])
    return np.array([p["label"] for p in preds]), probs, r.json()["step"]


def send_v2(c: httpx.Client, sid: str, images: np.ndarray, start: bool) -> tuple[np.ndarray, np.ndarray, int]:
    body, headers = encode_infer(images, sid, start=start)
    r = c.post(infer_path(MODEL), content=body, headers=headers)
    assert r.status_code == 200, r.text
    doc, tensors = decode_infer(r.content, r.headers)
    return tensors["labels"], tensors["probabilities"], doc["parameters"]["step"]


def assert_states_equal(srv, ref: Reference, sids: list[str], atol: float = 1e-5) -> None:
    """Each stream's durable snapshot (written before its last answer) equals its alone-run state."""
    engine = ref.engine
    for sid in sids:
        got = engine.load_state(Path(srv.settings.snapshot_dir) / f"{sid}.safetensors")
        want = ref.states[sid]
        assert got.step == want.step and got.images == want.images, sid
        assert set(got.tensors) == set(want.tensors), sid
        for k, v in want.tensors.items():
            torch.testing.assert_close(got.tensors[k].float(), v.float(), atol=atol, rtol=1e-5, equal_nan=True,
                                       msg=lambda m, k=k, sid=sid: f"{sid} {k}: {m}")


@pytest.mark.timeout(600)
def test_eight_concurrent_streams_get_what_they_get_alone(live_server, tmp_path, digit_images):
    # the default adaptation (EATA, per-stream BatchNorm EMA, the source-checking guard), with an 8-image gradient
    # window so that these few requests update; mixed request sizes; streams 0-3 on /predict, 4-7 on V2 (the first
    # request a sequence_start: an exact reset inside the fused call)
    srv = live_server(settings_for(tmp_path / "s", update_images=8))
    sids = [f"f{i}" for i in range(8)]
    rounds = 4
    sizes = {sid: [1 + (i + r) % 5 for r in range(rounds)] for i, sid in enumerate(sids)}
    data = {sid: [digit_images[(3 * i + 5 * r) % 24:][: sizes[sid][r]] for r in range(rounds)]
            for i, sid in enumerate(sids)}
    got: dict[str, list] = {sid: [] for sid in sids}
    barrier = threading.Barrier(len(sids), timeout=120)
    errors: list[BaseException] = []

    def client(i: int, sid: str) -> None:
        try:
            with srv.client() as c:
                for r in range(rounds):
                    barrier.wait()  # every round's requests arrive together
                    x = data[sid][r]
                    got[sid].append(send_predict(c, sid, x) if i < 4 else send_v2(c, sid, x, start=r == 0))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i, sid)) for i, sid in enumerate(sids)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert all(len(got[sid]) == rounds for sid in sids)

    ref = Reference(srv)
    for i, sid in enumerate(sids):
        for r in range(rounds):
            want = ref.step(sid, data[sid][r], reset=i >= 4 and r == 0)
            labels, probs, step = got[sid][r]
            assert labels.tolist() == want.argmax(1).tolist(), (sid, r)
            cols = probs.shape[1]  # /predict answers the top-5 scores, V2 every class
            want_cols = want if cols == want.shape[1] else np.sort(want, axis=1)[:, -cols:]
            np.testing.assert_allclose(probs if cols == want.shape[1] else np.sort(probs, axis=1), want_cols,
                                       atol=1e-5, err_msg=f"{sid} request {r}")
        assert got[sid][-1][2] == ref.states[sid].step, sid  # the step count each answer reports
    assert_states_equal(srv, ref, sids)
    with srv.client() as c:
        steps, streams = metric(c, "tta_fused_step_streams_count"), metric(c, "tta_fused_step_streams_sum")
        images = metric(c, "tta_fused_step_images_sum")
        assert streams == len(sids) * rounds and images == sum(map(sum, sizes.values()))
        assert steps < streams, "no fused step held more than one stream"
        assert metric(c, "tta_fused_queue_wait_seconds_count") == len(sids) * rounds


@pytest.mark.timeout(600)
def test_a_streams_concurrent_requests_are_applied_one_at_a_time_in_a_consistent_order(live_server, tmp_path,
                                                                                         digit_images):
    # one update per request: a response's `step` is its place in the stream's order. Each stream's requests are
    # all in flight at once (their order is the order their bodies completed); whatever that order, the stream
    # must have applied them one at a time, in it, with the answers of that sequence
    srv = live_server(settings_for(tmp_path / "o", method="tent", optimizer="sgd", lr=0.01, update_images=1,
                                   bn_stats="batch", guard_check_share=0.0, max_batch_delay_ms=20.0))
    sids, per_stream = [f"o{i}" for i in range(3)], 4
    # 6-10 images per request: with BatchNorm batch statistics over 2-4 images, a fused step and a step alone drift
    # apart by float error amplified through near-zero batch variances (measured with the fused engine: up to 4e-2
    # in the SGD momentum after 4 steps at lr 0.05), which is the engine's matter, not the scheduler's. lr 0.01, not
    # 0.05: with the segment path's BatchNorm backward, lr 0.05 left one theta entry of one stream 1.17e-5 from its
    # alone run after 4 steps on some request orders (CI, 2026-11-30); an order swap of two requests still moves
    # theta by 3e-3 (measured)
    data = {(sid, k): digit_images[(4 * i + 3 * k) % 16:][:6 + 2 * (k % 3)] for i, sid in enumerate(sids)
            for k in range(per_stream)}
    got: dict[tuple[str, int], tuple] = {}
    errors: list[BaseException] = []

    def send(sid: str, k: int) -> None:
        try:
            with srv.client() as c:
                got[(sid, k)] = send_predict(c, sid, data[(sid, k)])
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=send, args=key) for key in data]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    ref = Reference(srv)
    for sid in sids:
        order = sorted(range(per_stream), key=lambda k: got[(sid, k)][2])
        assert [got[(sid, k)][2] for k in order] == list(range(1, per_stream + 1)), sid  # no step lost or doubled
        for k in order:
            want = ref.step(sid, data[(sid, k)])
            labels, probs, _ = got[(sid, k)]
            assert labels.tolist() == want.argmax(1).tolist()
            np.testing.assert_allclose(np.sort(probs, axis=1), np.sort(want, axis=1)[:, -probs.shape[1]:], atol=1e-5)
    # the states after 4 chained steps: 1e-4, not the engine's per-step 1e-5 (tests/test_fused.py). Which requests
    # share a fused step depends on timing, and with batch statistics over 6-10 images the float error of a step
    # fused with others (convolutions of a different batch) grows through the chain: one theta entry of 2080 was
    # 1.9e-5 from its alone run (CI-like load, 2026-11-30). An order error moves theta by ~3e-3 (measured), 30x more
    assert_states_equal(srv, ref, sids, atol=1e-4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("group", [64, 1], ids=["group_commit", "one_write_per_stream"])
def test_a_failed_snapshot_write_in_a_fused_step(live_server, tmp_path, digit_images, group):
    """Group commit (the default): the fused step's three streams share one durable write, so one stream's failed
    file fails and reverts all three. One write per stream (commit_group_max_streams=1): only its own stream."""
    srv = live_server(settings_for(tmp_path / "w", method="tent", optimizer="sgd", lr=0.05, update_images=1,
                                   bn_stats="batch", guard_check_share=0.0, max_batch_delay_ms=0.0,
                                   commit_group_max_streams=group))
    store = srv.app.state.svc.store
    x = digit_images[:4]
    with srv.client() as c:
        for sid in ("good1", "bad", "good2"):  # one durable step each first
            send_predict(c, sid, x)
    real_write = store._write_files
    writes: list[list[str]] = []

    def write(items, *a, **kw):
        writes.append([item[0] for item in items])
        if any(item[0] == "bad" for item in items):
            raise OSError(28, "No space left on device (injected)")
        return real_write(items, *a, **kw)

    with gated_engine(srv) as gate:
        store._write_files = write
        results: dict[str, httpx.Response] = {}

        def send(sid: str) -> None:
            with srv.client() as c:
                results[sid] = c.post("/predict", content=npy_bytes(x), headers={**NPY, "X-Stream-Id": sid})

        with srv.client() as c:
            calls_before = metric(c, "tta_fused_step_streams_count")
            streams_before = metric(c, "tta_fused_step_streams_sum")
            blocker = threading.Thread(target=send, args=("blocker",))
            blocker.start()  # the first call holds the gate; the three requests below queue for the next one
            wait_for(lambda: metric(c, "tta_fused_step_streams_count") == calls_before + 1)
            threads = [threading.Thread(target=send, args=(sid,)) for sid in ("good1", "bad", "good2")]
            for t in threads:
                t.start()
            wait_for(lambda: metric(c, "tta_queue_depth") == 4)
            gate.set()
            for t in [blocker, *threads]:
                t.join(120)
            assert metric(c, "tta_fused_step_streams_count") == calls_before + 2  # blocker alone, then the three
            assert metric(c, "tta_fused_step_streams_sum") - streams_before == 4
            store._write_files = real_write
            assert writes[0] == ["blocker"]
            assert sorted(sid for w in writes[1:] for sid in w) == ["bad", "good1", "good2"]
            assert len(writes) == (2 if group > 1 else 4)  # one write for the fused step's group, or one each
            failed = ("good1", "bad", "good2") if group > 1 else ("bad",)
            for sid in ("good1", "bad", "good2", "blocker"):
                r = results[sid]
                if sid in failed:
                    assert r.status_code == 507 and r.json()["error"]["code"] == "snapshot_write_failed", r.text
                    assert "injected" not in r.text
                    assert c.get(f"/streams/{sid}", headers=AUTH).json()["step"] == 1  # not acknowledged, not kept
                else:
                    assert r.status_code == 200 and r.json()["step"] == (1 if sid == "blocker" else 2), r.text
                    assert c.get(f"/streams/{sid}", headers=AUTH).json()["step"] == r.json()["step"]
            assert send_predict(c, "bad", x)[2] == 2  # the streams continue from their last durable state
            assert send_predict(c, "good1", x)[2] == (2 if group > 1 else 3)


@pytest.mark.timeout(300)
def test_queues_fill_and_answer_429_while_a_fused_step_runs(live_server, tmp_path, digit_images):
    srv = live_server(settings_for(tmp_path / "q", method="tent", optimizer="sgd", lr=0.05, update_images=1,
                                   bn_stats="batch", guard_check_share=0.0, max_queue_per_stream=1,
                                   max_queue_total=2, max_batch_delay_ms=0.0))
    with gated_engine(srv) as gate:
        body = npy_bytes(digit_images[:4])
        threads, results = posting_threads(srv, body, NPY, ["q0", "q1"])
        with srv.client() as c:
            for t in threads:
                t.start()
            wait_for(lambda: metric(c, "tta_queue_depth") == 2)
            r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": "q0"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "stream_queue_full"
            r = c.post("/predict", content=body, headers={**NPY, "X-Stream-Id": "q-other"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and "retry-after" in r.headers
            gate.set()
            for t in threads:
                t.join(60)
            assert all(results[s].status_code == 200 and results[s].json()["step"] == 1 for s in ("q0", "q1"))
            assert c.get("/streams/q-other", headers=AUTH).status_code == 404


def test_fused_step_settings_reach_the_scheduler_and_are_validated(tmp_path):
    from pydantic import ValidationError

    from service.metrics import ServiceMetrics
    from service.runtime import ServiceState

    s = settings_for(tmp_path, max_batch_delay_ms=7.5, max_batch_images=96, max_batch_streams=12,
                     batch_active_window_ms=250, max_concurrent_streams=3)
    svc = ServiceState(s, ServiceMetrics())

    class Store:
        def queued_streams(self):
            return set()

    class Rt:
        engine = object()

    sched = svc.open_scheduler(Rt(), Store())  # type: ignore[arg-type]
    assert sched is not None and sched.limits.max_delay_s == pytest.approx(0.0075)
    assert (sched.limits.max_images, sched.limits.max_streams) == (96, 12)
    assert sched.limits.active_window_s == pytest.approx(0.25) and sched._slots._value == 3
    off = ServiceState(settings_for(tmp_path, fused_steps=False), ServiceMetrics())
    assert off.open_scheduler(Rt(), Store()) is None  # type: ignore[arg-type]
    for bad in (dict(max_batch_delay_ms=-1), dict(max_batch_images=0), dict(max_batch_streams=0),
                dict(batch_active_window_ms=-5)):
        with pytest.raises(ValidationError):
            settings_for(tmp_path, **bad)
