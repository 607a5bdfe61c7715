"""Bring your own dataset (docs/custom-data.md), end to end on a small generated folder dataset, through the CLI:
train-source -> make-c -> pretrain -> bench (tree with any domain names, held-out sweep on own data) -> serve +
replay; and the error cases: one clear line, no output folder."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mgg_core.cli import main as mgg

pytestmark = pytest.mark.timeout(600)

CLASSES = ("left", "middle", "right")


def _image(k: int, rng: np.random.Generator, shift: str | None = None) -> np.ndarray:
    """A 24 px RGB image: dark noise with a bright bar at a class-dependent column; ``shift`` darkens or tints."""
    img = rng.integers(0, 60, size=(24, 24, 3)).astype(np.float64)
    c0 = 3 + 7 * k + int(rng.integers(-1, 2))
    img[:, c0:c0 + 4, :] = rng.integers(180, 256, size=3)
    if shift == "dusk":
        img *= 0.45
    elif shift == "tint":
        img[..., 0] = np.clip(img[..., 0] + 90, 0, 255)
    return img.astype(np.uint8)


def write_folder(root: Path, per_class: int, seed: int, shift: str | None = None, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for k, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(k, rng, shift)).save(root / name / f"{i:03d}.{ext}")
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("byod")
    data = write_folder(root / "shapes", per_class=30, seed=0)
    # your own shifts, any names: flat domains and one with severities
    shifts = root / "shifts"
    write_folder(shifts / "dusk", 8, seed=1, shift="dusk")
    write_folder(shifts / "tinted-cam", 8, seed=2, shift="tint")
    write_folder(shifts / "rain" / "2", 8, seed=3, shift="dusk")
    heldout = root / "heldout"
    write_folder(heldout / "night", 8, seed=4, shift="dusk")
    w = root / "work"
    assert mgg(["train-source", "--data", str(data), "--model", "test_resnet", "--out", str(w / "clf.safetensors"),
                "--epochs", "8", "--batch-size", "8", "--threads", "1", "--quiet"]) == 0
    assert mgg(["data", "make-c", "--data", str(data), "--out", str(w / "data-c"), "--corruptions", "gaussian_noise",
                "fog", "--severities", "3", "--no-progress"]) == 0
    assert mgg(["pretrain", "--classifier", str(w / "clf.safetensors"), "--out", str(w / "mgg.safetensors"),
                "--epochs", "1", "--samples", "8", "--val-images", "12", "--write-stats", "--no-progress", "--quiet",
                "--device", "cpu", "--cache-dir", str(root / "cache")]) == 0
    yield {"root": root, "data": data, "shifts": shifts, "heldout": heldout, "w": w, "cache": root / "cache"}
    torch.set_num_threads(threads)


def _bench(world, out: str, *extra: str) -> list[str]:
    w = world["w"]
    return ["bench", "--classifier", str(w / "clf.safetensors"), "--mgg-checkpoint", str(w / "mgg.safetensors"),
            "--batch-size", "8", "--cache-dir", str(world["cache"]), "--out", str(world["root"] / out), *extra]


def test_walkthrough_train_makec_pretrain_bench(world, capsys):
    w = world["w"]
    card = json.loads((w / "clf.json").read_text())
    assert card["dataset"]["kind"] == "folder" and card["clean_test_accuracy"] > 60  # 3 classes: chance is 33
    gml_card = json.loads((w / "mgg.json").read_text())
    assert gml_card["data"]["source"] == str(world["data"])      # pretrain read the data from the classifier card
    assert (w / "clf_foa_stats.safetensors").is_file()
    # bench on the make-c tree; held-out sweep on the clean train split named by the tree's manifest; --no-progress
    capsys.readouterr()
    assert mgg(_bench(world, "bench-c", "--data", str(w / "data-c"), "--severity", "3", "--methods", "noadapt",
                      "tent", "eata", "mgg", "--sweep-lrs", "1e-3,1e-2", "--val-images", "12", "--no-progress")) == 0
    res = json.loads((world["root"] / "bench-c" / "results.json").read_text())
    assert list(res["summary"]["noadapt"]["per_domain"]) == ["fog-3", "gaussian_noise-3"]
    sweep = res["protocol"]["lr_sweep"]
    assert set(sweep["chosen"]) == {"tent", "eata", "mgg"} and sweep["data"]["clean_data"] == str(world["data"])
    # EATA's Fisher from the clean train data behind the tree (its make-c manifest), not silently dropped
    assert res["protocol"]["fisher"].startswith("72 clean ") and "make-c manifest" in res["protocol"]["fisher"]
    err = capsys.readouterr().err
    # a line per finished (method, domain) even with --no-progress, and no long progress lines
    assert "tent fog-3:" in err and "mgg gaussian_noise-3:" in err
    assert max(len(line) for line in err.splitlines()) < 300


def test_bench_own_domain_folders_and_sweep_data(world, capsys):
    out = world["root"] / "bench-shifts"
    # no --data: read from the card would be the plain folder; here the user's own shifts, any names, mixed layouts
    assert mgg(_bench(world, "bench-shifts", "--data", str(world["shifts"]), "--severity", "2", "--methods",
                      "noadapt", "tent", "--sweep-lrs", "1e-3,1e-2", "--sweep-data", str(world["heldout"]),
                      "--no-progress", "--quiet")) == 0
    res = json.loads((out / "results.json").read_text())
    assert sorted(res["summary"]["noadapt"]["per_domain"]) == ["dusk", "rain-2", "tinted-cam"]
    assert res["protocol"]["lr_sweep"]["data"]["domains"] == ["night"]
    # a subset by name, and 'clean' of a plain folder = its uncorrupted test split
    assert mgg(_bench(world, "bench-pick", "--data", str(world["shifts"]), "--domains", "tinted-cam", "--methods",
                      "noadapt", "--no-progress", "--quiet")) == 0
    assert mgg(_bench(world, "bench-clean", "--domains", "clean", "fog", "--methods", "noadapt", "--no-progress",
                      "--quiet")) == 0           # no --data: the card's folder, corrupted on the fly
    res = json.loads((world["root"] / "bench-clean" / "results.json").read_text())
    assert res["protocol"]["stream"]["data"] == str(world["data"])
    assert res["summary"]["noadapt"]["per_domain"]["clean"] > 60
    # --stream JSON without data, and the library with no spec: the card's data too, never MNIST-5k
    stream = json.dumps({"domains": ["clean"], "batch_size": 8})
    assert mgg(_bench(world, "bench-stream", "--stream", stream, "--methods", "noadapt", "--no-progress",
                      "--quiet")) == 0
    res = json.loads((world["root"] / "bench-stream" / "results.json").read_text())
    assert res["protocol"]["stream"]["data"] == str(world["data"])
    from mgg_core.bench import bench

    lib = bench(world["root"] / "bench-lib", None, classifier=str(world["w"] / "clf.safetensors"),
                methods=["noadapt"], cache_dir=world["cache"], progress=False, quiet=True)
    assert lib["protocol"]["stream"]["data"] == str(world["data"])
    assert len(lib["summary"]["noadapt"]["per_domain"]) == 15


def test_eata_without_clean_data_warns_loudly(world, tmp_path, capsys):
    """A classifier whose card's data is gone and a tree without manifest: EATA runs without its Fisher, loudly."""
    import shutil

    w = tmp_path / "moved"
    w.mkdir()
    for f in ("clf.safetensors", "clf.json", "clf_foa_stats.safetensors"):
        shutil.copy(world["w"] / f, w / f)
    card = json.loads((w / "clf.json").read_text())
    card["training"]["data"] = str(tmp_path / "gone")
    card["dataset"]["root"] = str(tmp_path / "gone")
    (w / "clf.json").write_text(json.dumps(card))
    capsys.readouterr()
    assert mgg(["bench", "--classifier", str(w / "clf.safetensors"), "--data", str(world["shifts"]), "--methods",
                "eata", "--lr", "eata=1e-3", "--batch-size", "8", "--cache-dir", str(world["cache"]), "--out",
                str(tmp_path / "b"), "--no-progress", "--quiet"]) == 0
    assert "WARNING: eata runs WITHOUT its Fisher regulariser" in capsys.readouterr().err
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert "without its Fisher" in json.dumps(res["protocol"])
    # and no --data at all: refuse, naming what to pass
    with pytest.raises(SystemExit) as e:
        mgg(["bench", "--classifier", str(w / "clf.safetensors"), "--out", str(tmp_path / "none")])
    assert "names no dataset" in str(e.value.code) and "--data" in str(e.value.code)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("case", ["missing-data", "unknown-domain", "sweep-not-tree", "pretrain-missing",
                                  "pretrain-no-train-left"])
def test_errors_are_one_line_and_leave_no_output(world, tmp_path, case):
    out = tmp_path / "out" / "run"
    argv = {
        "missing-data": _bench(world, "x", "--data", str(tmp_path / "nope")),
        "unknown-domain": _bench(world, "x", "--data", str(world["shifts"]), "--domains", "snowstorm"),
        "sweep-not-tree": _bench(world, "x", "--data", str(world["shifts"]), "--sweep-lrs", "1e-3",
                                 "--sweep-data", str(world["data"])),
        "pretrain-missing": ["pretrain", "--classifier", str(world["w"] / "clf.safetensors"), "--data",
                             str(tmp_path / "nope"), "--out", str(out / "m.safetensors")],
        "pretrain-no-train-left": ["pretrain", "--classifier", str(world["w"] / "clf.safetensors"),
                                   "--out", str(out / "m.safetensors")],     # default --val-images 1000 > 72
    }[case]
    if argv[0] == "bench":
        argv[argv.index("--out") + 1] = str(out)
    with pytest.raises(SystemExit) as e:
        mgg(argv)
    msg = str(e.value.code)
    assert msg.startswith(f"mgg {argv[0]}: error: ") and "\n" not in msg and "Traceback" not in msg
    assert {"missing-data": "nope", "unknown-domain": "snowstorm", "sweep-not-tree": "not a tree",
            "pretrain-missing": "nope", "pretrain-no-train-left": "lower --val-images"}[case] in msg
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    assert not out.exists()


def test_cache_is_keyed_by_content_not_path(world, tmp_path):
    import shutil

    from mgg_core.bench.data import source_id
    from mgg_core.data.sources import open_source

    a = source_id(open_source(str(world["data"]), "test"), "test")
    moved = shutil.copytree(world["data"], tmp_path / "elsewhere", copy_function=shutil.copy2)
    assert source_id(open_source(str(moved), "test"), "test") == a          # same files, other path: same key
    f = sorted((moved / "left").iterdir())[0]
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(f)
    os.utime(f, ns=(1, 1))
    assert source_id(open_source(str(moved), "test"), "test") != a          # edited content: new key


def test_replay_own_data_against_the_service(world, tmp_path):
    import argparse

    from conftest import LiveServer

    import mgg_replay as rp
    from mgg_core.cli import build_parser
    from service.settings import ServiceSettings

    w = world["w"]
    settings = ServiceSettings(model=str(w / "clf.safetensors"), mgg_checkpoint=str(w / "mgg.safetensors"),
                               device="cpu", snapshot_dir=tmp_path / "snap")
    srv = LiveServer(settings)
    try:
        for data, doms, expect in ((world["data"], "clean,fog", {"clean", "fog-3"}),
                                   (world["shifts"], None, {"dusk", "tinted-cam", "rain-2"})):
            argv = ["replay", "--url", srv.url, "--data", str(data), "--severity", "3" if doms else "2",
                    "--streams", "1", "--images-per-domain", "8", "--batch-size", "4", "--no-progress",
                    "--out", str(tmp_path / Path(data).name)]
            if doms:
                argv += ["--corruptions", doms]
            args: argparse.Namespace = build_parser("replay").parse_args(argv)
            assert rp.main(args) == 0
            rep = json.loads((tmp_path / Path(data).name / "replay.json").read_text())
            assert set(rep["summary"]["accuracy_by_domain"]) == expect
            assert rep["summary"]["images_answered"] == 8 * len(expect)
    finally:
        srv.stop()


def test_bench_refuses_a_folder_split_other_than_the_classifiers(world, tmp_path):
    import shutil

    for f in ("clf.safetensors", "clf.json", "clf_foa_stats.safetensors"):
        shutil.copy(world["w"] / f, tmp_path / f)
    card = json.loads((tmp_path / "clf.json").read_text())
    card["split"]["split_seed"] = 3
    (tmp_path / "clf.json").write_text(json.dumps(card))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        mgg(["bench", "--classifier", str(tmp_path / "clf.safetensors"), "--methods", "noadapt", "--out", str(out),
             "--cache-dir", str(world["cache"])])
    assert "--split-seed 3" in str(e.value.code) and not out.exists()
