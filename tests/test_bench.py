"""mgg bench end to end on a tiny stream: JSON protocol, table, plot, curves, per-(method, domain) resume."""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import write_random_classifier


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mgg_core.mgg import GradientMemoryLayer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("bench")
    clf = write_random_classifier(root)
    mgg = root / "mgg.safetensors"
    GradientMemoryLayer(seed=0).save(mgg, card={"kind": "mgg-gml"})
    yield {"root": root, "clf": clf, "mgg": mgg}
    torch.set_num_threads(threads)


def _spec(reset="per_domain"):
    from mgg_core.data.streams import StreamSpec

    return StreamSpec(domains=[("gaussian_noise", 5), ("fog", 5)], batch_size=8, limit=24, reset=reset, seed=0)


def _run(setup, out, reset="per_domain", methods=("noadapt", "bn", "tent", "mgg"), **kw):
    from mgg_core.bench import bench

    return bench(out, _spec(reset), classifier=str(setup["clf"]), methods=list(methods),
                 mgg_checkpoint=str(setup["mgg"]), cache_dir=setup["root"] / "cache", progress=False, quiet=True,
                 lrs={"tent": 1e-2, "mgg": 1e-2}, **kw)


def test_bench_writes_protocol_table_and_plot(setup):
    out = setup["root"] / "reset"
    res = _run(setup, out)
    for f in ("results.json", "results.md", "online_accuracy.png"):
        assert (out / f).is_file(), f
    on_disk = json.loads((out / "results.json").read_text())
    p = on_disk["protocol"]
    assert p["model"] == "test_resnet" and p["weights_file"] == "clf.safetensors"
    assert len(p["weights_sha256"]) == 64
    assert p["preprocessing"]["input_size"] == [3, 32, 32] and p["preprocessing"]["mean"] == [0.13] * 3
    assert p["dataset"]["data"] == "mnist5k" and p["dataset"]["split"] == "test"
    assert p["corruptions"] == ["gaussian_noise", "fog"] and p["severity"] == 5 and p["batch_size"] == 8
    assert p["reset_policy"] == "domain" and p["seed"] == 0 and p["images_per_domain"] == [24, 24]
    assert p["stream"]["limit"] == 24 and p["stream_order"]["domains"] == ["gaussian_noise-5", "fog-5"]
    assert {"torch", "timm"} <= set(p["versions"])
    assert p["methods"]["tent"]["lr"] == 1e-2 and p["methods"]["tent"]["engine"]["optimizer"]["name"] == "sgd"
    assert p["methods"]["mgg"]["engine"]["optimizer"]["name"] == "mgg"
    assert p["methods"]["mgg"]["engine"]["method"] == "foa" and p["mgg_checkpoint"] == "mgg.safetensors"
    assert p["methods"]["tent"]["engine"]["method_hparams"] == {"num_classes": 10}
    assert p["methods"]["noadapt"]["engine"]["bn_stats"] == "source"
    s = on_disk["summary"]
    for m in ("noadapt", "bn", "tent", "mgg"):
        per = s[m]["per_domain"]
        assert set(per) == {"gaussian_noise-5", "fog-5"}
        assert s[m]["mean_accuracy"] == pytest.approx(np.mean(list(per.values())))
        rs = on_disk["results"][m]
        assert [sum(r["count"]) for r in rs] == [24, 24] and [len(r["count"]) for r in rs] == [3, 3]
        # accuracy = correct / count, recomputed from the raw per-batch numbers
        for r in rs:
            assert r["accuracy"] == pytest.approx(100 * sum(r["correct"]) / 24)
    assert s["noadapt"]["updates"] == 0 and s["bn"]["updates"] == 0
    assert s["tent"]["updates"] == 6 and s["mgg"]["updates"] == 6
    assert s["_reference"]["method"] == "tent"
    table = (out / "results.md").read_text()
    assert "| method | mean | gaussian_noise | fog |" in table
    for m in ("noadapt", "bn", "tent", "mgg"):
        assert f"| {m} | " in table
    assert "TENT's final online accuracy" in table
    assert res["summary"]["tent"]["mean_accuracy"] == s["tent"]["mean_accuracy"]


def test_bench_resumes_from_cached_domain_results(setup):
    out = setup["root"] / "resume"
    first = _run(setup, out, methods=("noadapt", "tent"))
    cached = sorted((out / "cache" / "reset-domain").rglob("*.json"))
    assert len(cached) == 4
    # tamper one cached result: a resumed run must reuse it rather than recompute
    victim = out / "cache" / "reset-domain" / "tent" / "001_fog-5.json"
    d = json.loads(victim.read_text())
    d["correct"] = [0] * len(d["correct"])
    victim.write_text(json.dumps(d))
    again = _run(setup, out, methods=("noadapt", "tent"))
    assert again["summary"]["tent"]["per_domain"]["fog-5"] == 0.0
    tent_again, tent_first = again["summary"]["tent"]["per_domain"], first["summary"]["tent"]["per_domain"]
    assert tent_again["gaussian_noise-5"] == tent_first["gaussian_noise-5"]
    # a different protocol (lr) invalidates the cache
    from mgg_core.bench import bench

    other = bench(out, _spec(), classifier=str(setup["clf"]), methods=["tent"], cache_dir=setup["root"] / "cache",
                  progress=False, quiet=True, lrs={"tent": 5e-2})
    assert other["summary"]["tent"]["per_domain"]["fog-5"] > 0.0


def test_continual_stream_resumes_from_state_snapshot(setup):
    out = setup["root"] / "continual"
    full = _run(setup, out, reset="never", methods=("tent",))
    assert full["protocol"]["reset_policy"] == "never"
    assert (out / "cache" / "reset-never" / "tent" / "000.state.safetensors").is_file()
    # drop the second domain's result: the rerun must continue from the snapshot after domain 0, same numbers
    (out / "cache" / "reset-never" / "tent" / "001_fog-5.json").unlink()
    resumed = _run(setup, out, reset="never", methods=("tent",))
    assert resumed["results"]["tent"][1]["correct"] == full["results"]["tent"][1]["correct"]


def test_curves_and_updates_to_reference():
    from mgg_core.bench import DomainResult, batches_to_reach, online_curve, summarize

    a = DomainResult("a", correct=[0, 5, 10], count=[10, 10, 10], adapted=[True] * 3, seconds=0)
    b = DomainResult("b", correct=[10, 10, 10], count=[10, 10, 10], adapted=[True] * 3, seconds=0)
    np.testing.assert_allclose(online_curve([a, b], "domain"), [50.0, 62.5, 75.0])
    np.testing.assert_allclose(online_curve([a, b], "never"),
                               100 * np.cumsum([0, 5, 10, 10, 10, 10]) / np.arange(10, 70, 10))
    # reaching means staying at or above the target from then on
    assert batches_to_reach(np.array([60.0, 40.0, 55.0, 56.0]), 50.0) == 3
    assert batches_to_reach(np.array([60.0, 70.0]), 50.0) == 1
    assert batches_to_reach(np.array([10.0, 20.0]), 50.0) is None
    slow = DomainResult("a", correct=[0, 0, 10, 10], count=[10] * 4, adapted=[True] * 4, seconds=0)
    fast = DomainResult("a", correct=[0, 10, 10, 10], count=[10] * 4, adapted=[True] * 4, seconds=0)
    s = summarize({"tent": [slow], "mgg": [fast]}, "domain")
    assert s["_reference"]["final_online_accuracy"] == pytest.approx(50.0)
    assert s["mgg"]["batches_to_reference_final"] == 2 and s["mgg"]["fraction_of_reference_batches"] == 0.5
    assert s["tent"]["batches_to_reference_final"] == 4
