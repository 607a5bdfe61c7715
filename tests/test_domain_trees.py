"""Domain-folder trees with any names (flat DIR/<domain>/<class>/<image> and DIR/<domain>/<severity>/<class>/...),
'clean' in streams and replay plans, and the short progress lines of long jobs."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mgg_core.data.imagenet_c import ImageNetC, is_domain_tree
from mgg_core.data.streams import StreamSpec, domain_name, iter_batches, normalise_domain


def _folder(root: Path, classes=("a", "b"), n=3, value=0) -> Path:
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), value + 10 * k + i, np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture()
def tree(tmp_path):
    _folder(tmp_path / "night", value=0)
    _folder(tmp_path / "camera-2", value=50)         # a flat folder whose name ends in -<digits>
    _folder(tmp_path / "rain" / "1", value=100)
    _folder(tmp_path / "rain" / "3", value=150)
    _folder(tmp_path / "clean", value=200)
    return tmp_path


def test_tree_with_any_domain_names(tree):
    assert is_domain_tree(tree)
    t = ImageNetC(tree)
    assert t.corruptions() == ["camera-2", "clean", "night", "rain"]
    assert t.severities("night") == [] and t.severities("rain") == [1, 3]
    assert t.domains() == ["camera-2", "clean", "night", ("rain", 1), ("rain", 3)]
    assert t.domains(severity=3) == ["camera-2", "clean", "night", ("rain", 3)]
    assert t.resolve("night") == "night" and t.resolve("rain", 3) == ("rain", 3) and t.resolve("rain-1") == ("rain", 1)
    assert t.resolve("camera-2") == "camera-2"
    with pytest.raises(ValueError, match="'fog' not found.*night"):
        t.resolve("fog")
    with pytest.raises(ValueError, match="severities \\[1, 3\\], not 5"):
        t.resolve("rain", 5)
    src = t.domain("night")
    assert len(src) == 6 and src.class_names == ["a", "b"] and src.describe()["severity"] is None
    assert t.class_names == ["a", "b"] and len(t) == 30


def test_plain_and_split_folders_are_not_trees(tmp_path):
    plain = _folder(tmp_path / "plain")
    assert not is_domain_tree(plain)
    _folder(tmp_path / "split" / "train")
    _folder(tmp_path / "split" / "test")
    assert not is_domain_tree(tmp_path / "split")
    _folder(tmp_path / "sev" / "1")                    # one domain's severity level
    assert not is_domain_tree(tmp_path / "sev")
    assert not is_domain_tree(tmp_path / "missing")


def test_stream_over_named_domains_of_a_tree(tree):
    spec = StreamSpec(domains=["night", "camera-2", ("rain", 3), "clean"], batch_size=4, data=str(tree))
    assert spec.domain_names == ["night", "camera-2", "rain-3", "clean"]
    assert StreamSpec.from_json(spec.to_json()) == spec
    batches = list(iter_batches(spec))
    seen: dict[str, list[int]] = {}
    for b in batches:
        for d, img in zip(b.domains, b.images, strict=True):
            seen.setdefault(d, []).append(int(img[0, 0, 0]))
    assert {d: len(v) for d, v in seen.items()} == {"night": 6, "camera-2": 6, "rain-3": 6, "clean": 6}
    assert min(seen["rain-3"]) >= 150 and max(seen["night"]) < 50 and min(seen["clean"]) >= 200
    with pytest.raises(ValueError, match="'snow' not found"):
        list(iter_batches(StreamSpec(domains=["snow"], data=str(tree))))


def test_domain_names_and_on_the_fly_validation():
    assert normalise_domain("clean") == "clean" and normalise_domain("fog-3") == ("fog", 3)
    assert normalise_domain("night") == "night" and domain_name(["fog", 2]) == "fog-2"
    with pytest.raises(ValueError, match="unknown corruption 'night'"):
        StreamSpec(domains=["night"])                  # mnist5k is corrupted on the fly: no folder named night
    with pytest.raises(ValueError):
        StreamSpec(domains=[("fog", 6)])


def test_replay_plans_take_clean_and_tree_domains(tree, tmp_path):
    from mgg_replay.plans import SpecOptions, base_spec, build_plans

    spec = base_spec(SpecOptions(corruptions=["clean", "fog", "snow-2"]))
    assert spec.domains == ["clean", ("fog", 5), ("snow", 2)]
    plans, classes, _ = build_plans(SpecOptions(corruptions=["clean"], images_per_domain=8, batch_size=4,
                                                streams=1), "s")
    b = next(plans[0].make_batches())
    assert b.domain == "clean" and b.images.shape == (4, 32, 32, 3) and classes == [str(i) for i in range(10)]
    # a tree with any names: every domain at --severity (flat ones as they are), or the named ones
    every = base_spec(SpecOptions(data=str(tree), severity=3))
    assert every.domain_names == ["camera-2", "clean", "night", "rain-3"]
    named = base_spec(SpecOptions(data=str(tree), corruptions=["night", "rain"], severity=1))
    assert named.domain_names == ["night", "rain-1"]
    # a plain folder: its test split corrupted on the fly, 'clean' the uncorrupted one
    plain = _folder(tmp_path / "plain", n=5)
    assert base_spec(SpecOptions(data=str(plain), corruptions=["clean", "fog"])).domains == ["clean", ("fog", 5)]
    with pytest.raises(ValueError, match="'nope' not found"):
        base_spec(SpecOptions(data=str(tree), corruptions=["nope"]))


def test_replay_cli_errors_are_one_line(tree, tmp_path):
    from mgg_core.cli import main

    for argv, needle in ((["--data", str(tmp_path / "missing")], "not a folder"),
                         (["--data", str(tree), "--corruptions", "fog"], "'fog' not found"),
                         (["--corruptions", "nightfall"], "unknown corruption 'nightfall'")):
        with pytest.raises(SystemExit) as e:
            main(["replay", "--url", "http://127.0.0.1:9", "--out", str(tmp_path / "o"), *argv])
        msg = str(e.value.code)
        assert msg.startswith("mgg replay: error: ") and needle in msg and "\n" not in msg
        assert not (tmp_path / "o").exists()


def test_line_progress_prints_short_whole_lines():
    from mgg_core.progress import LineProgress

    buf = io.StringIO()
    bar = LineProgress(total=1000, desc="bench", interval=0.0, stream=buf)
    bar.set_postfix(method="x" * 500)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1000 and "\r" not in buf.getvalue()
    assert lines[-1].startswith("bench: 1000/1000 (100%)") and max(map(len, lines)) <= 200
    quiet = io.StringIO()
    bar = LineProgress(total=10, desc="q", enabled=False, stream=quiet)
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""
    slow = io.StringIO()
    bar = LineProgress(total=10, desc="s", interval=3600, stream=slow)
    bar.update(10)
    bar.close()
    assert slow.getvalue().splitlines() == ["s: 10/10 (100%)"]   # only the final line within the interval
