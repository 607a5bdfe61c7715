"""Ray Serve backend (``service.rayserve``) on a local Ray cluster (loopback, 2 CPUs, 2 shard replicas).

What it shows: per-stream routing is strict (16 streams over both replicas, each on one), a stream's replica
can be killed mid-stream without losing an acknowledged step (its next batches give the same predictions as a
stream that saw no failure), reset and delete reach the stream's replica, 8 replayed streams get the same
per-stream accuracy as the single-process service, and every replica's metrics come out of one /metrics.
Unit tests of the lease/fencing rule and the metrics merge need no cluster.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import time

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("CI") and importlib.util.find_spec("ray") is None:  # CI installs the extra: never skip there
    pytest.fail("Ray Serve is not installed (scripts/setup.sh --with-ray)", pytrace=False)
pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from service.rayserve.lease import LeaseTable, LeaseTimeout  # noqa: E402
from service.rayserve.metrics import merge_replica_metrics  # noqa: E402

pytestmark = pytest.mark.timeout(600)

MODEL = os.environ.get("MGG_REPLAY_TEST_MODEL", "resnet")
# one update per request and no source checks: these tests count steps per request (test_smallbatch covers the
# small-batch defaults)
SINGLE_UPDATE = {"update_images": 1, "bn_stats": "batch", "guard_check_share": 0.0}
APP = "mgg"


# ------------------------------------------------------------------------------------------ no cluster


def test_lease_fencing_rule(tmp_path):
    import asyncio

    a, b = LeaseTable(tmp_path, "A", timeout_s=0.2), LeaseTable(tmp_path, "B", timeout_s=0.2)

    async def run() -> list:
        seen = []
        async with a.hold("s") as lease:
            seen.append((lease.owner, lease.epoch, lease.fresh))
            with pytest.raises(LeaseTimeout):  # B cannot take the stream while A advances it
                async with b.hold("s"):
                    pass
            lease.commit(last_request="r1")
        async with a.hold("s") as lease:  # nobody else touched it: A's resident state is current
            seen.append((lease.owner, lease.epoch, lease.fresh))
            assert lease.record["last_request"] == "r1"
        async with b.hold("s") as lease:  # B takes over: epoch bumped, B must restore from the snapshot
            seen.append((lease.owner, lease.epoch, lease.fresh))
        async with a.hold("s") as lease:  # A's copy is stale now: fenced (fresh) again
            seen.append((lease.owner, lease.epoch, lease.fresh))
        return seen

    assert asyncio.run(run()) == [("A", 1, True), ("A", 1, False), ("B", 2, True), ("A", 3, True)]
    assert json.loads(a.path("s").read_text())["owner"] == "A"


def test_metrics_merge_adds_a_replica_label():
    from prometheus_client import CollectorRegistry, Counter, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    texts = {}
    for rid, n in (("r1", 3), ("r2", 5)):
        reg = CollectorRegistry()
        c = Counter("tta_images_total", "Images.", registry=reg)
        c.inc(n)
        Counter("tta_http_requests_total", "x", registry=reg).inc()
        texts[rid] = generate_latest(reg).decode()
    reg = CollectorRegistry()
    reg.register(merge_replica_metrics(texts, skip=("tta_http_",)))
    out = generate_latest(reg).decode()
    fams = {f.name: f for f in text_string_to_metric_families(out)}
    assert "tta_http_requests" not in fams and out.count("# TYPE tta_images_total counter") == 1
    vals = {s.labels["replica"]: s.value for s in fams["tta_images"].samples if s.name == "tta_images_total"}
    assert vals == {"r1": 3.0, "r2": 5.0}


@pytest.mark.filterwarnings("ignore:coroutine 'Shard.__del__' was never awaited")  # Serve awaits it; GC cannot
def test_two_shards_on_one_snapshot_dir_never_advance_a_stale_copy(tmp_path):
    """Two shard replicas (no Ray: the class itself) share a snapshot folder: a stream that moves back and forth
    continues its step count, a retried request id is answered from the lease record without a second step, and
    a stale copy's eviction snapshot is not written over the newer state."""
    import asyncio

    from service.rayserve.shard import Shard
    from service.settings import ServiceSettings

    settings = ServiceSettings(model=MODEL, method="foa", device="cpu", torch_threads=1, snapshot_dir=tmp_path,
                               **SINGLE_UPDATE).model_dump()
    a, b = Shard(settings), Shard(settings)
    ctype = "application/x-npy"

    async def run() -> None:
        steps = []
        for shard, k in ((a, 0), (a, 1), (b, 2), (a, 3)):  # A, A, moved to B, back to A (A's copy is stale)
            out = await shard.predict("s", npy(k), ctype, f"req-{k}")
            assert out["status"] == 200 and out["served_by"] == shard.replica_id
            steps.append(out["body"]["step"])
        assert steps == [1, 2, 3, 4]
        again = await a.predict("s", npy(3), ctype, "req-3")  # the ingress retrying the last request
        assert again.get("replayed") and again["body"]["step"] == 4
        assert (await b.info("s"))["body"]["step"] == 4  # B restores (fenced), sees A's step
        assert (await b.predict("s", npy(4), ctype, "req-4"))["body"]["step"] == 5
        before = (tmp_path / "s.safetensors").read_bytes()
        a.store._streams["s"].dirty = True  # pretend A still held unsaved changes
        await a.store.evict_idle(now=float("inf"))  # A lost the lease to B: its eviction must not write
        assert (tmp_path / "s.safetensors").read_bytes() == before
        assert a.store._streams["s"].state is None  # the stale copy is gone
        await a.store.close()
        await b.store.close()

    asyncio.run(run())


@pytest.mark.filterwarnings("ignore:coroutine 'Shard.__del__' was never awaited:RuntimeWarning")
def test_a_shard_fuses_concurrent_streams_and_answers_each_as_alone(tmp_path):
    """A shard replica (no Ray: the class itself) runs the service's fused-step scheduler: four streams' calls
    arriving together share fused steps, and each gets the answer a shard without fused steps gives it."""
    import asyncio

    from service.rayserve.shard import Shard
    from service.settings import ServiceSettings

    def shard(folder: str, fused: bool) -> Shard:
        return Shard(ServiceSettings(model=MODEL, method="foa", device="cpu", torch_threads=1,
                                     snapshot_dir=tmp_path / folder, fused_steps=fused, max_concurrent_streams=1,
                                     max_batch_delay_ms=200, **SINGLE_UPDATE).model_dump())

    fused, plain = shard("fused", True), shard("plain", False)
    sids = [f"s{i}" for i in range(4)]

    async def run(sh: Shard) -> list[list[dict]]:
        out = []
        for r in range(2):
            res = await asyncio.gather(*(sh.predict(sid, npy(10 * i + r, n=2 + i), "application/x-npy",
                                                    f"req-{sid}-{r}") for i, sid in enumerate(sids)))
            assert all(x["status"] == 200 for x in res), res
            out.append([x["body"] for x in res])
        await sh.__del__()  # the graceful shutdown Serve runs: store and scheduler closed
        return out

    got, want = asyncio.run(run(fused)), asyncio.run(run(plain))
    for g_round, w_round in zip(got, want, strict=True):
        for g, w in zip(g_round, w_round, strict=True):
            assert g["step"] == w["step"]
            assert [p["label"] for p in g["predictions"]] == [p["label"] for p in w["predictions"]]
            np.testing.assert_allclose([p["score"] for p in g["predictions"]],
                                       [p["score"] for p in w["predictions"]], atol=1e-5)
    reg = fused.metrics.registry
    calls, streams = reg.get_sample_value("tta_fused_step_streams_count"), reg.get_sample_value(
        "tta_fused_step_streams_sum")
    assert streams == 8 and calls < 8, (calls, streams)  # fused steps happened
    assert plain.svc.scheduler is None and plain.metrics.registry.get_sample_value(
        "tta_fused_step_streams_count") == 0


def _shard_of(app):
    return app._bound_deployment.init_args[0]._bound_deployment


def test_autoscaling_and_resources_reach_the_shard_deployment():
    from service.rayserve.app import build_app, split_args
    from service.rayserve.router import ROUTER_CLASS

    svc, ray_s = split_args({"model": MODEL, "ray_min_replicas": 1, "ray_max_replicas": 4,
                             "ray_target_ongoing_requests": 3, "ray_replica_num_cpus": 0.5})
    shard = _shard_of(build_app(svc, ray_s))
    cfg = shard._deployment_config
    a = cfg.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 4, 3.0)
    assert cfg.request_router_config.request_router_class == ROUTER_CLASS
    assert shard.ray_actor_options["num_cpus"] == 0.5
    fixed = _shard_of(build_app(*split_args({"model": MODEL, "ray_replicas": 3})))._deployment_config
    assert fixed.autoscaling_config is None and fixed.num_replicas == 3
    with pytest.raises(ValueError, match="min_replicas"):
        split_args({"ray_min_replicas": 5, "ray_max_replicas": 2})
    with pytest.raises(ValueError, match="unknown settings: modle, ray_replika"):
        split_args({"modle": "resnet", "ray_replika": 2})


@pytest.mark.parametrize("path", ["deploy/ray/serve_config.yaml", "deploy/ray/rayservice.yaml"])
def test_deploy_configs_are_valid_serve_configs(path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from service.rayserve.app import split_args

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    docs = list(yaml.safe_load_all((root / path).read_text()))
    serve_cfgs = [yaml.safe_load(d["spec"]["serveConfigV2"]) for d in docs if d and d.get("kind") == "RayService"]
    cfg = serve_cfgs[0] if serve_cfgs else docs[0]
    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = schema.applications
    assert app.import_path == "service.rayserve.app:app_builder"
    svc, ray_s = split_args(app.args)  # every arg is a known setting
    assert str(svc.snapshot_dir) == "/mnt/mgg-snapshots"
    assert ray_s.replicas >= 1


def test_cli_backend_ray_flags(capsys):
    from mgg_core.cli import main

    assert main(["serve", "--backend", "ray", "--replicas", "3", "--max-replicas", "5", "--ray-address", "auto",
                 "--print-settings"]) == 0
    out = capsys.readouterr().out
    ray_part = json.loads(out[out.rindex("{\n"):])
    assert (ray_part["replicas"], ray_part["max_replicas"], ray_part["address"]) == (3, 5, "auto")
    assert main(["serve", "--backend", "ray", "--replicas", "0", "--print-settings"]) == 2
    assert "replicas" in capsys.readouterr().err


def test_promtool_accepts_the_ray_prometheus_config():
    import shutil
    import subprocess
    from pathlib import Path

    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing (scripts/setup.sh --with-prometheus)")
        pytest.skip("promtool not installed")
    config = Path(__file__).resolve().parents[1] / "deploy/ray/prometheus.yml"
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout + r.stderr  # the shared alerts load from this config too


# ------------------------------------------------------------------------------------------ local cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray import serve

    from mgg_replay.server import free_port
    from service.rayserve.app import start
    from service.rayserve.settings import RaySettings
    from service.settings import ServiceSettings

    snap = tmp_path_factory.mktemp("ray-snapshots")
    port = free_port()
    settings = ServiceSettings(model=MODEL, method="foa", device="cpu", torch_threads=1, snapshot_dir=snap, port=port,
                               **SINGLE_UPDATE,
                               host="127.0.0.1")
    start(settings, RaySettings(num_cpus=2, replicas=2, replica_num_cpus=0.5, request_timeout_s=90))
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=90) as client:
        yield {"url": url, "client": client, "snapshot_dir": snap, "settings": settings}
    serve.shutdown()
    ray.shutdown()


def npy(seed: int, n: int = 8) -> bytes:
    x = np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def predict(client, sid: str, body: bytes):
    r = client.post("/predict", content=body, headers={"X-Stream-Id": sid, "Content-Type": "application/x-npy"})
    assert r.status_code == 200, r.text
    return r.headers["X-Served-By"], r.json()


def test_sixteen_streams_spread_over_both_replicas_each_on_one(cluster):
    from concurrent.futures import ThreadPoolExecutor

    def stream(i: int) -> list[str]:  # 3 batches in order; 8 streams at a time
        sid, got = f"spread-{i}", []
        with httpx.Client(base_url=cluster["url"], timeout=90) as c:
            for rnd in range(3):
                replica, body = predict(c, sid, npy(100 * i + rnd))
                assert body["step"] == rnd + 1 and body["stream_id"] == sid
                got.append(replica)
        return got

    with ThreadPoolExecutor(8) as pool:
        served = {f"spread-{i}": r for i, r in enumerate(pool.map(stream, range(16)))}
    client = cluster["client"]
    assert all(len(set(v)) == 1 for v in served.values()), served
    assert len({v[0] for v in served.values()}) == 2, "both replicas hold streams"
    listing = client.get("/streams").json()
    assert len(listing["replicas"]) == 2
    by_id = {s["stream_id"]: s for s in listing["streams"]}
    assert all(by_id[sid]["served_by"] == v[0] and by_id[sid]["step"] == 3 for sid, v in served.items())


def test_metrics_of_every_replica_in_one_scrape(cluster):
    from prometheus_client.parser import text_string_to_metric_families

    client = cluster["client"]
    predict(client, "metrics-a", npy(1))
    text = client.get("/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    images = {s.labels["replica"]: s.value for s in fams["tta_images"].samples if s.name == "tta_images_total"}
    assert len(images) == 2 and sum(images.values()) >= 8
    http = [s for s in fams["tta_http_requests"].samples if s.labels.get("route") == "/predict"]
    assert http and "replica" not in http[0].labels  # the ingress's own HTTP metrics
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[1] / "deploy/grafana/dashboards/tta-ray.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"\btta_[a-z_]+", e)}
    exported = {s.name for f in fams.values() for s in f.samples}
    exported |= {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    assert names and names <= exported, names - exported  # every metric of the replica dashboard is exported
    assert all("replica" in e or "tta_http" in e or "ingress" in e for e in exprs)


def test_reset_and_delete_reach_the_stream_replica(cluster):
    client, snap = cluster["client"], cluster["snapshot_dir"]
    sid = "admin-stream"
    replica, _ = predict(client, sid, npy(7))
    _, body = predict(client, sid, npy(8))
    assert body["step"] == 2
    info = client.get(f"/streams/{sid}")
    assert info.status_code == 200 and info.headers["X-Served-By"] == replica and info.json()["step"] == 2
    r = client.post("/reset", json={"stream_id": sid})
    assert r.status_code == 200 and r.json() == {"reset": [sid]} and r.headers["X-Served-By"] == replica
    again, body = predict(client, sid, npy(7))
    assert again == replica and body["step"] == 1, "reset reached the replica that serves the stream"
    assert (snap / f"{sid}.safetensors").is_file()
    r = client.delete(f"/streams/{sid}")
    assert r.status_code == 204 and r.headers["X-Served-By"] == replica
    assert not (snap / f"{sid}.safetensors").exists()
    r = client.get(f"/streams/{sid}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_stream"
    assert client.post("/reset", json={"stream_id": "never-seen"}).status_code == 404
    bad = client.post("/predict", content=b"not npy", headers={"X-Stream-Id": sid, "Content-Type": "application/x-npy"})
    assert bad.status_code == 400 and bad.json()["error"]["code"].startswith("invalid_npy")


def test_stream_queue_limit_at_the_ingress_and_every_accepted_batch_applied_once(cluster):
    from concurrent.futures import ThreadPoolExecutor

    limit = cluster["settings"].max_queue_per_stream
    body = npy(5)

    def send(_: int) -> httpx.Response:
        with httpx.Client(base_url=cluster["url"], timeout=90) as c:
            headers = {"X-Stream-Id": "queued", "Content-Type": "application/x-npy"}
            return c.post("/predict", content=body, headers=headers)

    with ThreadPoolExecutor(limit + 8) as pool:
        rs = list(pool.map(send, range(limit + 8)))
    refused = [r for r in rs if r.status_code == 429]
    ok = [r for r in rs if r.status_code == 200]
    assert len(ok) + len(refused) == len(rs) and refused and len(ok) >= limit // 2
    assert {r.json()["error"]["code"] for r in refused} == {"stream_queue_full"}
    assert all(r.headers["Retry-After"] for r in refused)
    assert sorted(r.json()["step"] for r in ok) == list(range(1, len(ok) + 1))  # each accepted batch once


def listing(path) -> dict:
    """A snapshot's listing data (its safetensors header's ``listing``), read without its tensors."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["listing"])


def test_killing_the_stream_replica_loses_no_acknowledged_step(cluster):
    import ray

    client, snap = cluster["client"], cluster["snapshot_dir"]
    bodies = [npy(1000 + k) for k in range(6)]
    control = [predict(client, "failover-control", b)[1] for b in bodies]  # the same batches, no failure

    first = [predict(client, "failover", b) for b in bodies[:3]]
    replica = first[0][0]
    assert {r for r, _ in first} == {replica} and [b["step"] for _, b in first] == [1, 2, 3]
    meta = listing(snap / "failover.safetensors")
    assert meta["step"] == 3, "every acknowledged step is on disk before its response"

    actor = ray.get_actor(f"SERVE_REPLICA::{APP}#TTAShard#{replica}", namespace="serve")
    ray.kill(actor, no_restart=True)
    t0 = time.perf_counter()
    after = [predict(client, "failover", b) for b in bodies[3:]]
    assert time.perf_counter() - t0 < 90
    assert all(r != replica for r, _ in after), "the dead replica cannot have served"
    got = [b for _, b in first] + [b for _, b in after]
    assert [b["step"] for b in got] == [1, 2, 3, 4, 5, 6], "no acknowledged step lost, none applied twice"
    for g, c in zip(got, control, strict=True):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in c["predictions"]]
        np.testing.assert_allclose([p["score"] for p in g["predictions"]], [p["score"] for p in c["predictions"]],
                                   rtol=0, atol=1e-5)


def test_replica_killed_with_a_request_in_flight_the_request_is_retried_elsewhere(cluster):
    """The test holds the stream's lease lock, so the next batch waits inside the replica; the replica is killed
    with it in flight; the ingress retries it on another replica, which applies it once the lock is free."""
    import fcntl
    import threading

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    client, snap = cluster["client"], cluster["snapshot_dir"]

    def retries() -> float:
        fams = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
        return sum(s.value for s in fams["tta_ingress_retries"].samples if s.name == "tta_ingress_retries_total")

    replica, _ = predict(client, "inflight", npy(1))
    assert predict(client, "inflight", npy(2))[1]["step"] == 2
    retried_before = retries()
    fd = os.open(snap / ".leases" / "inflight.lease", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(r=predict(cluster["client"], "inflight", npy(3))))
    try:
        sender.start()
        time.sleep(3)  # the batch is now waiting for the lease inside the replica
        assert sender.is_alive()
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#TTAShard#{replica}", namespace="serve"), no_restart=True)
        time.sleep(3)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    sender.join(60)
    served_by, body = result["r"]
    assert served_by != replica and body["step"] == 3, "applied once, on another replica"
    assert retries() > retried_before
    assert predict(client, "inflight", npy(4))[1]["step"] == 4


def test_eight_replayed_streams_match_the_single_process_accuracy(cluster, tmp_path):
    import argparse

    import mgg_replay as rp

    def run(url: str, out) -> dict:
        argv = ["--url", url, "--streams", "8", "--images-per-domain", "32", "--batch-size", "16",
                "--corruptions", "fog,pixelate", "--out", str(out), "--no-progress"]
        args = rp.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(argv)
        args.argv = argv
        assert rp.main(args) == 0
        return json.loads((out / "replay.json").read_text())["summary"]

    ray_summary = run(cluster["url"], tmp_path / "ray")
    env = {"MGG_MODEL": MODEL, "MGG_METHOD": "foa", "MGG_DEVICE": "cpu", "MGG_TORCH_THREADS": "1",
           "MGG_SNAPSHOT_DIR": str(tmp_path / "s"),
           **{f"MGG_{k.upper()}": str(v) for k, v in SINGLE_UPDATE.items()}}
    with rp.LocalServer(env, log_path=tmp_path / "single.log") as single:
        single_summary = run(single.url, tmp_path / "single")
    def by_index(summary: dict) -> dict[str, float]:  # stream ids carry the run id: key by the stream index
        return {sid.rsplit("-", 1)[1]: e["accuracy"] for sid, e in summary["accuracy_by_stream"].items()}

    acc_ray, acc_single = by_index(ray_summary), by_index(single_summary)
    assert len(acc_ray) == 8 and set(acc_ray) == set(acc_single)
    for k in acc_ray:
        assert abs(acc_ray[k] - acc_single[k]) <= 0.005, (k, acc_ray[k], acc_single[k])
    assert ray_summary["images_answered"] == single_summary["images_answered"] == 8 * 64
    assert ray_summary["errors"]["failed_requests"] == 0


# ------------------------------------------------------------------- Open Inference Protocol (V2) on Ray

V2_OUTPUTS = ("probabilities", "labels", "entropy")


@pytest.fixture(scope="module")
def triton(cluster):
    tc = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency")
    client = tc.InferenceServerClient(url=cluster["url"].removeprefix("http://"), network_timeout=120.0)
    yield client
    client.close()


def v2_model(cluster) -> str:
    return str(cluster["client"].get("/info").json()["model"]["model"])  # the card's name: the default V2 name


def v2_infer(triton, model: str, images: np.ndarray, seq, **kw) -> dict[str, np.ndarray]:
    import tritonclient.http as tc

    inp = tc.InferInput("images", list(images.shape), "UINT8")
    inp.set_data_from_numpy(images, binary_data=True)
    outs = [tc.InferRequestedOutput(n, binary_data=True) for n in V2_OUTPUTS]
    res = triton.infer(model, [inp], outputs=outs, sequence_id=seq, **kw)
    return {"params": res.get_response()["parameters"], **{n: res.as_numpy(n) for n in V2_OUTPUTS}}


def images(seed: int, n: int = 8) -> np.ndarray:
    return np.load(io.BytesIO(npy(seed, n)))


def test_v2_health_and_metadata_on_ray(cluster, triton):
    from tritonclient.utils import InferenceServerException

    model, client = v2_model(cluster), cluster["client"]
    assert triton.is_server_live() and triton.is_server_ready()
    meta = triton.get_server_metadata()
    assert meta["name"] == "mgg-tta" and {"sequence", "binary_tensor_data"} <= set(meta["extensions"])
    assert triton.is_model_ready(model) and triton.is_model_ready(model, "1")
    assert not triton.is_model_ready("nope") and not triton.is_model_ready(model, "2")
    m = triton.get_model_metadata(model)
    assert m["name"] == model and m["versions"] == ["1"] and triton.get_model_metadata(model, "1") == m
    assert m["inputs"] == [{"name": "images", "datatype": "UINT8", "shape": [-1, -1, -1, -1]}]
    n_classes = client.get("/info").json()["model"]["num_classes"]
    assert [o["name"] for o in m["outputs"]] == list(V2_OUTPUTS) and m["outputs"][0]["shape"] == [-1, n_classes]
    with pytest.raises(InferenceServerException) as e:
        triton.get_model_metadata("nope")
    assert e.value.status() == "404" and "unknown model 'nope'" in e.value.message()
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{model}/versions/1/ready").json() == {"name": model, "ready": True}


def test_v2_sequence_on_ray_equals_predict_and_shares_the_stream(cluster, triton):
    """The same batches through V2 (sequence_id) and /predict (X-Stream-Id) on Ray give the same labels and
    probabilities; a sequence_id is the stream of that X-Stream-Id: same replica, one step count."""
    client, model = cluster["client"], v2_model(cluster)
    batches = [images(2000 + k) for k in range(3)] + [images(2000)]
    v2 = [v2_infer(triton, model, b, "v2ray-a") for b in batches]
    v1 = [predict(client, "v2ray-b", npy_of(b))[1] for b in batches]
    for k, (a, p) in enumerate(zip(v2, v1, strict=True)):
        assert a["params"]["step"] == p["step"] == k + 1 and a["params"]["sequence_id"] == "v2ray-a"
        assert a["labels"].tolist() == [q["label"] for q in p["predictions"]]
        for row, q in enumerate(p["predictions"]):
            got = [float(a["probabilities"][row, t["label"]]) for t in q["topk"]]
            np.testing.assert_allclose(got, [t["score"] for t in q["topk"]], rtol=0, atol=1e-6)
            assert abs(float(a["entropy"][row]) - q["entropy"]) <= 1e-6
    assert not np.array_equal(v2[3]["probabilities"], v2[0]["probabilities"]), "the sequence adapted"
    # one stream whichever protocol: /predict on the V2 sequence's stream continues it on the same replica
    body = {"parameters": {"sequence_id": "v2ray-a"}, "outputs": [{"name": "labels"}],
            "inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28],
                        "data": images(7, 2).ravel().tolist()}]}
    r = client.post(f"/v2/models/{model}/infer", json=body)
    assert r.status_code == 200 and r.json()["parameters"]["step"] == 5, r.text
    replica, after = predict(client, "v2ray-a", npy(8))
    assert r.headers["X-Served-By"] == replica and after["step"] == 6


def test_v2_sequence_start_and_end_on_ray(cluster, triton):
    client, model, snap = cluster["client"], v2_model(cluster), cluster["snapshot_dir"]
    x = images(3000)
    first = v2_infer(triton, model, x, 77)  # an integer id: the stream "77"
    for k in range(2):
        v2_infer(triton, model, images(3001 + k), 77)
    adapted = v2_infer(triton, model, x, "77")
    assert adapted["params"]["step"] == 4 and not np.array_equal(adapted["probabilities"], first["probabilities"])
    again = v2_infer(triton, model, x, 77, sequence_start=True, sequence_end=True)
    assert again["params"]["step"] == 1 and again["params"]["unloaded"] is True
    for n in V2_OUTPUTS:  # the source model's outputs, exactly
        assert again[n].tobytes() == first[n].tobytes(), n
    info = client.get("/streams/77").json()
    assert info["step"] == 1 and listing(snap / "77.safetensors")["step"] == 1


def test_v2_bad_input_on_ray_is_4xx_with_an_error_and_changes_nothing(cluster, triton):
    client, model = cluster["client"], v2_model(cluster)
    v2_infer(triton, model, images(4000, 2), "v2ray-bad")

    def body(**over) -> dict:
        inp = {"name": "images", "datatype": "UINT8", "shape": [2, 28, 28], "data": images(1, 2).ravel().tolist()}
        inp.update(over.pop("input", {}))
        return {"parameters": {"sequence_id": "v2ray-bad"}, "inputs": [inp], **over}

    limit = cluster["settings"].max_images
    cases = [
        (f"/v2/models/{model}/infer", body(input={"datatype": "FP32"}), 400, "datatype"),
        (f"/v2/models/{model}/infer", body(input={"shape": [2, 28]}), 400, "shape"),
        (f"/v2/models/{model}/infer", body(input={"name": "x"}), 400, "exactly one input"),
        (f"/v2/models/{model}/infer", body(input={"data": [300] * (2 * 28 * 28)}), 400, "0..255"),
        (f"/v2/models/{model}/infer", body(parameters={"sequence_id": "bad id!"}), 400, "sequence_id"),
        (f"/v2/models/{model}/infer", body(input={"shape": [limit + 1, 2, 2], "data": [0] * ((limit + 1) * 4)}),
         413, str(limit)),  # refused by the shard replica (the decode limits of /predict)
        ("/v2/models/nope/infer", body(), 404, "unknown model"),
        (f"/v2/models/{model}/versions/2/infer", body(), 404, "version"),
    ]
    for path, doc, status, words in cases:
        r = client.post(path, json=doc)
        assert r.status_code == status, (words, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err, str) and words in err, (words, err)
    r = client.post(f"/v2/models/{model}/infer", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert client.get("/streams/v2ray-bad").json()["step"] == 1, "no refused request changed the stream"


def npy_of(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_scaling_down_moves_streams_with_their_state(cluster):
    """Last in the module (it leaves one replica): the spread streams (3 steps each) continue at step 4 on the
    remaining replica after the deployment is scaled from 2 replicas to 1."""
    from service.rayserve.app import start
    from service.rayserve.settings import RaySettings

    client = cluster["client"]
    listing = client.get("/streams").json()["streams"]
    before = {s["stream_id"]: s for s in listing if s["stream_id"].startswith("spread-")}
    assert len(before) == 16 and {s["step"] for s in before.values()} == {3}
    start(cluster["settings"], RaySettings(num_cpus=2, replicas=1, replica_num_cpus=0.5, request_timeout_s=90))
    deadline = time.monotonic() + 90
    while len(client.get("/streams").json()["replicas"]) != 1:
        assert time.monotonic() < deadline, "the deployment did not scale down"
        time.sleep(1)
    served = set()
    for i in range(16):
        replica, body = predict(client, f"spread-{i}", npy(100 * i + 3))
        assert body["step"] == 4, (i, body["step"])
        served.add(replica)
    assert len(served) == 1
    assert sum(before[f"spread-{i}"]["served_by"] not in served for i in range(16)) > 0, "some streams moved"


def test_keyed_requests_are_refused_on_ray_and_change_nothing(cluster, triton):
    """The Ray backend keeps no Idempotency-Key answers: a keyed request is a clear 400, never a silent second step."""
    client, model = cluster["client"], v2_model(cluster)
    predict(client, "ray-keyed", npy(7))
    r = client.post("/predict", content=npy(8), headers={"X-Stream-Id": "ray-keyed", "Idempotency-Key": "k1",
                                                         "Content-Type": "application/x-npy"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "idempotency_not_supported", r.text
    doc = {"parameters": {"sequence_id": "ray-keyed"},
           "inputs": [{"name": "images", "datatype": "UINT8", "shape": [2, 28, 28],
                       "data": images(2, 2).ravel().tolist()}]}
    r = client.post(f"/v2/models/{model}/infer", json=doc, headers={"Idempotency-Key": "k2"})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"], r.text
    assert client.get("/streams/ray-keyed").json()["step"] == 1, "no refused request changed the stream"
