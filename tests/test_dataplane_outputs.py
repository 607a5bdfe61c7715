"""The answer rows of a step (service.dataplane.Outputs, predictions) and the event-loop contracts of the routes: no
torch call and no thread hop per request that the design keeps off the loop."""
from __future__ import annotations

import inspect

import pytest
import torch

from service.dataplane import Outputs, make_predictions, predictions, softmax_outputs
from service.v2.routes import step_tensors


@pytest.mark.parametrize("topk", [1, 3, 5, 10])
def test_labels_are_the_argmax_with_ties_to_the_lower_class_whatever_topk(topk):
    # all-equal rows (a zero head), partial ties and ordinary rows: torch.topk breaks ties differently for
    # different k; the label must be argmax's (the first maximal index), the same for /predict and /v2
    logits = torch.tensor([[0.0] * 10, [1.0, 3.0, 3.0, 0.0, 3.0, 0, 0, 0, 0, 0], [0.1 * i for i in range(10)],
                           [2.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    o = Outputs.of(logits, topk)
    assert [row[0] for row in o.top_i] == logits.argmax(1).tolist() == [0, 1, 9, 0]
    assert all(len(row) == topk for row in o.top_i)
    assert o.top_i[1][:min(topk, 3)] == [1, 2, 4][:topk]  # tied scores listed by class index
    p, ent = softmax_outputs(logits)
    assert torch.equal(o.probs, p) and torch.equal(o.entropy, ent) and o.entropies == ent.tolist()
    assert o.top_p == [[float(p[r, i]) for i in row] for r, row in enumerate(o.top_i)]


def test_v2_labels_and_predict_rows_agree(monkeypatch):
    logits = torch.tensor([[0.0] * 10, [5.0, 0, 0, 0, 0, 0, 0, 0, 0, 5.0], [0.0, 1.0, 2.0, 0, 0, 0, 0, 0, 0, 0]])
    names = [f"c{i}" for i in range(10)]
    rows = make_predictions(logits, names, 5)

    class Out:  # the part of StepOutcome step_tensors reads
        outputs = Outputs.of(logits, 5)

    v2 = step_tensors(Out())  # type: ignore[arg-type]
    assert v2["labels"].tolist() == [r["label"] for r in rows] == [0, 0, 2]
    assert [r["entropy"] for r in rows] == v2["entropy"].tolist()
    assert predictions(Out.outputs, names) == rows


def test_route_dependencies_run_on_the_event_loop():
    # FastAPI runs a plain `def` dependency in its thread pool: one thread hop per dependency per request, each
    # waiting for the GIL behind the step threads (session 7: 99.6 -> 91.8 ms per 16-stream cycle when they
    # became async). Every dependency of service.routes.deps must stay a coroutine function
    from service.routes import deps

    names = ["get_service", "get_dataplane", "require_ready", "require_admin", "is_admin", "path_stream_id"]
    assert all(inspect.iscoroutinefunction(getattr(deps, n)) for n in names), \
        [n for n in names if not inspect.iscoroutinefunction(getattr(deps, n))]
    public = {n for n, f in vars(deps).items() if inspect.isfunction(f) and f.__module__ == deps.__name__}
    helpers = {"_token_matches", "check_admin", "check_stream_id"}  # plain functions called inside the deps
    assert public - helpers == set(names), public - helpers - set(names)


def test_predict_takes_no_dependencies_and_checks_readiness_before_its_headers(tmp_path):
    """``POST /predict`` resolves no FastAPI dependencies (they cost ~15% of the event loop per small request,
    session 8): it checks readiness (503), then ``X-Stream-Id`` and ``Idempotency-Key`` (400) itself, and the
    OpenAPI operation still documents both headers."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.routes import predict as route
    from service.settings import ServiceSettings

    app = create_app(ServiceSettings(_env_file=None, snapshot_dir=tmp_path))
    (api,) = [r for r in app.router.routes if getattr(r, "path", None) == "/predict"] or [
        r for inc in app.router.routes for r in getattr(getattr(inc, "original_router", None), "routes", [])
        if getattr(r, "path", None) == "/predict"]
    assert api.dependant.dependencies == []
    params = {p["name"]: p for p in app.openapi()["paths"]["/predict"]["post"]["parameters"]}
    assert params["X-Stream-Id"]["description"] == route.STREAM_ID_DESCRIPTION
    assert params["Idempotency-Key"]["description"] == route.IDEMPOTENCY_DESCRIPTION
    client = TestClient(app)  # not entered: no lifespan, so the model never loads and the service is not ready
    r = client.post("/predict", content=b"x", headers={"X-Stream-Id": "bad id!", "Idempotency-Key": "bad key"})
    assert r.status_code == 503, r.text
    app.state.svc.require_ready = lambda: (None, None)  # ready: the headers are checked next, stream id first
    r = client.post("/predict", content=b"x", headers={"X-Stream-Id": "bad id!", "Idempotency-Key": "bad key"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_stream_id", r.text
    r = client.post("/predict", content=b"x", headers={"X-Stream-Id": "ok", "Idempotency-Key": "bad key"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_idempotency_key", r.text
