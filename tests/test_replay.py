"""`mgg replay`: stream plans, statistics and reports, against real service processes (uvicorn subprocesses with
the bundled MNIST-5k ResNet, or MGG_REPLAY_TEST_MODEL), and the accuracy of adaptation vs the no-adaptation
baseline on the default stream."""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pytest

import mgg_replay as rp

pytestmark = pytest.mark.timeout(300)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODEL = os.environ.get("MGG_REPLAY_TEST_MODEL", "resnet")
# FOA loss + MGG with the bundled checkpoint pretrained for the model (the service default is EATA; one switch)
# FOA + MGG (one switch from the default). No source checks: on these short 48-image domains the source-checking
# guard may fall back to source on the first update and hold there, and the report test counts the server's steps.
ADAPT_ENV = {"MGG_MODEL": MODEL, "MGG_DEVICE": "cpu", "MGG_METHOD": "foa", "MGG_GUARD_CHECK_SHARE": "0"}


def parse(*argv: str) -> argparse.Namespace:
    sub = argparse.ArgumentParser().add_subparsers()
    args = rp.add_parser(sub).parse_args(list(argv))
    args.argv = list(argv)
    return args


# ------------------------------------------------------------------------------------------ no server


def test_stream_specs_give_each_stream_its_own_seed_and_domain_order():
    opts = rp.SpecOptions(streams=4, images_per_domain=32, corruptions=["gaussian_noise", "fog", "pixelate"])
    specs = rp.stream_specs(opts)
    assert [s.seed for s in specs] == [0, 1, 2, 3]
    orders = [tuple(s.domain_names) for s in specs]
    assert all(sorted(o) == ["fog-5", "gaussian_noise-5", "pixelate-5"] for o in orders)
    assert len(set(orders)) > 1, "shuffled domain order should differ between streams"
    assert [tuple(s.domain_names) for s in rp.stream_specs(opts)] == orders  # deterministic
    fixed = rp.stream_specs(rp.SpecOptions(streams=3, domain_order="fixed", corruptions=["fog", "contrast"]))
    assert all(s.domain_names == ["fog-5", "contrast-5"] for s in fixed)
    assert rp.stream_specs(rp.SpecOptions(streams=1, reset="every:3"))[0].reset == ("every", 3)


def test_plans_batches_and_labels():
    opts = rp.SpecOptions(streams=2, images_per_domain=40, batch_size=16, corruptions=["fog", "contrast"],
                          reset="per_domain")
    plans, class_names, desc = rp.build_plans(opts, "t")
    assert class_names == [str(i) for i in range(10)]
    assert [p.stream_id for p in plans] == ["t-0", "t-1"]
    assert all(p.total_images == 80 for p in plans)
    assert desc["base_spec"]["limit"] == 40 and desc["base_spec"]["reset"] == "per_domain"
    batches = list(plans[0].make_batches())
    assert [len(b.labels) for b in batches] == [16, 16, 8, 16, 16, 8]  # batches never span two domains
    assert [b.reset_before for b in batches] == [False, False, False, True, False, False]
    assert batches[0].images.dtype == np.uint8 and batches[0].images.shape[1:] == (32, 32, 3)
    # the two streams see different noise/subsets: not the same pixels
    other = next(iter(plans[1].make_batches()))
    assert not np.array_equal(other.images, batches[0].images)


def test_correct_mask_by_index_or_name():
    preds = [{"label": 3, "class_name": "3"}, {"label": 1, "class_name": "1"}]
    assert rp.correct_mask(preds, np.array([3, 2]), ["0", "1", "2", "3"]).tolist() == [True, False]
    by_name = [{"label": "cat", "class_name": "cat"}, {"label": "dog", "class_name": "dog"}]
    assert rp.count_correct(by_name, np.array([1, 1]), ["dog", "cat"]) == 1
    with pytest.raises(ValueError):
        rp.correct_mask(preds, np.array([1]), None)


def test_summary_statistics_and_error_accounting():
    R = rp.RequestRecord
    recs = [
        R("s-0", 0, "fog-5", 10, 200, 0.010, 0.1, correct=5, batch_entropy=0.5, adapted=True),
        R("s-0", 1, "fog-5", 10, 200, 0.020, 0.2, correct=7, batch_entropy=0.4, adapted=True, rolled_back=True),
        R("s-1", 0, "pixelate-5", 10, 429, None, 0.25, 0, error="retried", final=False),
        R("s-1", 0, "pixelate-5", 10, 200, 0.030, 0.3, correct=10, batch_entropy=0.1, adapted=False,
          skipped_reason="no_reliable_samples"),
        R("s-1", 1, "mixed", 10, 200, 0.040, 0.4, correct=4, per_domain={"fog-5": [1, 5], "pixelate-5": [3, 5]}),
        R("s-1", 2, "pixelate-5", 10, 500, 0.5, 0.5, error="boom"),
    ]
    s = rp.summarize(recs, wall_s=2.0)
    assert s["images_answered"] == 40 and s["correct"] == 26 and s["accuracy"] == pytest.approx(0.65)
    assert s["requests"] == 5 and s["requests_ok"] == 4 and s["requests_failed"] == 1
    assert s["errors"]["by_status"] == {"429": 1, "500": 1} and s["errors"]["retried"] == 1
    assert s["throughput_img_s"] == pytest.approx(20.0)
    lat = s["latency"]  # failed requests are not in the latency quantiles
    assert lat["count"] == 4 and lat["p50_ms"] == pytest.approx(25.0) and lat["max_ms"] == pytest.approx(40.0)
    assert lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    by_dom = s["accuracy_by_domain"]  # the mixed batch is split by sample domain
    assert by_dom["fog-5"]["correct"] == 13 and by_dom["fog-5"]["total"] == 25
    assert by_dom["pixelate-5"]["correct"] == 13 and by_dom["pixelate-5"]["total"] == 15
    assert by_dom["fog-5"]["mean_batch_entropy"] == pytest.approx(0.45)
    assert s["accuracy_by_stream"]["s-0"]["accuracy"] == pytest.approx(0.6)
    assert s["adapted_batches"] == 2 and s["skipped_batches"] == {"no_reliable_samples": 1}
    assert s["rollbacks"] == 1


def test_parse_build_info():
    text = ('# HELP tta_build_info x\ntta_build_info{device="cpu",method="noadapt",model="test_resnet",'
            'optimizer="sgd",torch="2.1",version="0.1.0"} 1.0\n')
    assert rp.parse_build_info(text)["method"] == "noadapt"
    assert rp.parse_build_info("tta_images_total 3\n") is None


# ------------------------------------------------------------------------------------------ live server


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay-servers")
    adapt = rp.LocalServer({**ADAPT_ENV, "MGG_SNAPSHOT_DIR": str(tmp / "a")}, log_path=tmp / "adapt.log")
    # a tiny global queue: concurrent streams get 429s that the client must retry
    tight = rp.LocalServer({**ADAPT_ENV, "MGG_SNAPSHOT_DIR": str(tmp / "t"), "MGG_MAX_QUEUE_TOTAL": "1"},
                           log_path=tmp / "tight.log")
    with adapt, tight:
        yield adapt, tight


def _check_report_structure(report: dict, url: str, streams: int, images_per_stream: int) -> None:
    assert report["schema"] == rp.REPORT_SCHEMA and report["mode"] == "adapt"
    p = report["protocol"]
    assert p["url"] == url and p["streams"] == streams and p["reset_at_start"] is True
    assert len(p["plans"]) == streams and len({pl["stream_id"] for pl in p["plans"]}) == streams
    assert {pl["seed"] for pl in p["plans"]} == set(range(streams))
    assert p["stream_spec"]["base_spec"]["data"] == "mnist5k"
    assert rp.server_method(report["server"]) == "foa"
    assert report["server"]["build_info"]["model"] and report["server"]["info"]["body"]["model"]["num_classes"] == 10
    assert report["versions"]["python"] and report["versions"]["numpy"]
    assert [r["reason"] for r in report["resets"]].count("start") == streams
    s = report["summary"]
    assert s["images_answered"] == s["images_planned"] == streams * images_per_stream
    assert s["errors"]["failed_requests"] == 0
    assert 0.15 < s["accuracy"] <= 1.0  # far above chance (10 classes)
    lat = s["latency"]
    assert 0 < lat["p50_ms"] <= lat["p95_ms"] <= lat["p99_ms"] <= lat["max_ms"] < 60_000
    assert s["throughput_img_s"] > 0 and s["wall_s"] > 0
    assert s["throughput_img_s"] == pytest.approx(s["images_answered"] / s["wall_s"])
    assert sum(e["total"] for e in s["accuracy_by_domain"].values()) == s["images_answered"]
    # per stream, the server's step counter moves forward with every adapted batch
    for sid in s["accuracy_by_stream"]:
        steps = [r["step"] for r in report["requests"] if r["stream_id"] == sid and r["final"]]
        assert steps == sorted(steps) and steps[-1] > steps[0]


@pytest.mark.parametrize("fmt", ["npy", "png"])
def test_replay_report_against_a_live_server(servers, tmp_path, fmt):
    adapt, _ = servers
    out = tmp_path / "out"
    args = parse("--url", adapt.url, "--streams", "2", "--images-per-domain", "48", "--batch-size", "16",
                 "--corruptions", "fog,pixelate", "--format", fmt, "--out", str(out), "--no-progress")
    assert rp.main(args) == 0
    report = json.loads((out / "replay.json").read_text())
    _check_report_structure(report, adapt.url, streams=2, images_per_stream=96)
    assert report["protocol"]["format"] == fmt
    md = (out / "replay.md").read_text()
    assert "online accuracy" in md and "fog-5" in md and "p50 / p95 / p99" in md
    png = (out / "replay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_replay_retries_429_and_counts_them(servers, tmp_path):
    _, tight = servers
    out = tmp_path / "out"
    args = parse("--url", tight.url, "--streams", "3", "--images-per-domain", "64", "--batch-size", "16",
                 "--corruptions", "fog", "--out", str(out), "--no-progress", "--max-retries", "200")
    assert rp.main(args) == 0
    s = json.loads((out / "replay.json").read_text())["summary"]
    assert s["images_answered"] == 3 * 64 and s["errors"]["failed_requests"] == 0
    assert s["errors"]["by_status"].get("429", 0) > 0, "three concurrent streams against a queue of 1"
    assert s["errors"]["retried"] == s["errors"]["by_status"]["429"]


def test_replay_bounded_by_images_and_duration(servers, tmp_path):
    adapt, _ = servers
    args = parse("--url", adapt.url, "--streams", "2", "--images-per-stream", "40", "--batch-size", "16",
                 "--out", str(tmp_path / "a"), "--no-progress")
    assert rp.main(args) == 0
    s = json.loads((tmp_path / "a" / "replay.json").read_text())["summary"]
    assert s["images_answered"] == 80 and s["requests"] == 2 * 3  # 16 + 16 + 8 per stream
    t = time.perf_counter()
    args = parse("--url", adapt.url, "--streams", "1", "--images-per-domain", "0", "--duration", "1.5",
                 "--out", str(tmp_path / "b"), "--no-progress")
    assert rp.main(args) == 0
    s = json.loads((tmp_path / "b" / "replay.json").read_text())["summary"]
    assert time.perf_counter() - t < 30
    assert 0 < s["images_answered"] < 6000 and s["wall_s"] < 10


def test_adaptation_beats_the_noadapt_baseline_on_the_default_stream(servers, tmp_path, capsys):
    """The default replay stream (2 streams x 6 corruptions x 256 MNIST-5k images at severity 5, continual):
    the service's default adaptation (FOA loss + MGG) clearly above the same model without adaptation (spawned
    by --baseline)."""
    adapt, _ = servers
    out = tmp_path / "cmp"
    assert rp.main(parse("--url", adapt.url, "--out", str(out), "--no-progress")) == 0
    assert rp.main(parse("--url", adapt.url, "--baseline", "--out", str(out), "--no-progress",
                         "--compare", str(out / "replay.json"))) == 0
    adapted = json.loads((out / "replay.json").read_text())
    base = json.loads((out / "baseline.json").read_text())
    assert base["mode"] == "baseline" and rp.server_method(base["server"]) == "noadapt"
    assert base["protocol"]["baseline"]["how"].startswith("spawned local server")
    assert base["protocol"]["baseline"]["url"] != adapt.url
    # the very same images in the very same order
    specs = [[p["stream_spec"] for p in r["protocol"]["plans"]] for r in (base, adapted)]
    assert specs[0] == specs[1]
    sa, sb = adapted["summary"], base["summary"]
    assert sa["images_answered"] == sb["images_answered"] == 2 * 6 * 256
    assert sb["adapted_batches"] == 0 and sa["adapted_batches"] > 0
    assert sa["accuracy"] > sb["accuracy"] + 0.08, (sa["accuracy"], sb["accuracy"])
    table = capsys.readouterr().out
    assert "ALL (online accuracy)" in table and "baseline (noadapt)" in table and "adapt (foa)" in table
    assert "Comparison with the baseline" in (out / "baseline.md").read_text()


def test_server_process_fails_fast_with_the_output_when_the_server_exits(tmp_path):
    import sys

    cmd = [sys.executable, "-c", "import sys; print('cannot start: no model'); sys.exit(3)"]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 3") as info:
        rp.ServerProcess(cmd, capture=True, ready_timeout=60).start()
    assert "cannot start: no model" in str(info.value)
    assert time.monotonic() - t0 < 30  # not the 60 s timeout
    with pytest.raises(RuntimeError, match="stopped before it was ready"):
        rp.wait_ready(None, "http://127.0.0.1:9", 60, alive=lambda: False)


def test_profile_option_reaches_every_stream_spec():
    from mgg_replay.cli import _spec_options

    specs = rp.stream_specs(_spec_options(parse("--profile", "cifar-c", "--streams", "2")))
    assert [s.profile for s in specs] == ["cifar-c", "cifar-c"]
    assert rp.stream_specs(_spec_options(parse()))[0].profile == "imagenet-c"
    with pytest.raises(SystemExit):
        parse("--profile", "cifar-100")
