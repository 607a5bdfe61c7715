"""The cifar-c corruption profile: CIFAR-10-C's constants, determinism, wiring into make-c and streams."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from mgg_core.data import cifar_c
from mgg_core.data import corruptions as C
from mgg_core.data.cli import make_c
from mgg_core.data.sources import mnist5k
from mgg_core.data.streams import StreamSpec, iter_batches


@pytest.fixture(scope="module")
def test_src():
    return mnist5k("test")


def test_constants_are_make_cifar_c_table():
    # spot checks against the published table (make_cifar_c.py), severity 1 and 5
    assert cifar_c.PARAMS["gaussian_noise"] == [0.04, 0.06, .08, .09, .10]
    assert cifar_c.PARAMS["shot_noise"][4] == 50 and cifar_c.PARAMS["impulse_noise"][4] == .07
    assert cifar_c.PARAMS["contrast"][4] == 0.15 and cifar_c.PARAMS["brightness"][4] == .3
    assert cifar_c.PARAMS["jpeg_compression"] == [80, 65, 58, 50, 40]
    assert cifar_c.PARAMS["fog"][4] == (1.5, 1.75) and cifar_c.PARAMS["frost"][4] == (0.75, 0.45)
    assert set(cifar_c.PARAMS) == set(C.ALL_CORRUPTIONS)
    assert all(len(v) == 5 for v in cifar_c.PARAMS.values())


@pytest.mark.parametrize("name", C.ALL_CORRUPTIONS)
def test_every_corruption_deterministic_and_milder_than_imagenet_c(test_src, name):
    digit = test_src.get_image(7)
    clean = C.prepare_image(digit).astype(float)
    a = C.corrupt_image(digit, name, 5, seed=1, index=7, profile="cifar-c")
    b = C.corrupt_image(digit, name, 5, seed=1, index=7, profile="cifar-c")
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    if name not in ("saturate",):        # saturate: grey digits have no saturation to change
        assert np.abs(a - clean).mean() > 0.05
    other = C.corrupt_image(digit, name, 5, seed=2, index=7, profile="cifar-c")
    inet = C.corrupt_image(digit, name, 5, seed=1, index=7, profile="imagenet-c")
    assert not np.array_equal(a, inet) or name == "saturate"
    assert other.shape == a.shape


def test_formulas_match_the_paper_constants():
    grey = np.full((32, 32, 3), 128, np.uint8)
    x = grey / 255.0
    # contrast: (x - mean) * c + mean; a flat image is unchanged, a step shrinks by c = 0.15 at severity 5
    step = np.zeros((32, 32, 3), np.uint8)
    step[:, 16:] = 200
    out = cifar_c.corrupt_cifar(step, "contrast", 5, seed=0).astype(float)
    assert out[0, 20, 0] - out[0, 0, 0] == pytest.approx(200 * 0.15, abs=1.5)
    # gaussian noise: additive N(0, 0.10) at severity 5 (in [0, 1] units)
    noisy = cifar_c.corrupt_cifar(grey, "gaussian_noise", 5, seed=0) / 255.0
    assert (noisy - x).std() == pytest.approx(0.10, rel=0.08)
    # shot noise: Poisson(x * 50) / 50 -> variance x / 50
    shot = cifar_c.corrupt_cifar(grey, "shot_noise", 5, seed=0) / 255.0
    assert (shot - x).var() == pytest.approx(x.mean() / 50, rel=0.15)
    # impulse: a fraction 0.07 of the values flipped to 0 or 255
    imp = cifar_c.corrupt_cifar(grey, "impulse_noise", 5, seed=0)
    assert ((imp == 0) | (imp == 255)).mean() == pytest.approx(0.07, abs=0.015)
    # brightness: V + 0.3 in HSV
    br = cifar_c.corrupt_cifar(grey, "brightness", 5, seed=0)
    assert br.mean() == pytest.approx(128 + 0.3 * 255, abs=1.5)


def test_cifar_c_leaves_global_rng_alone(test_src):
    np.random.seed(3)
    random.seed(3)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    C.corrupt_image(test_src.get_image(0), "frost", 5, seed=5, index=0, profile="cifar-c")
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before


def test_unknown_profile_is_a_clear_error(test_src):
    with pytest.raises(ValueError, match="unknown corruption profile"):
        C.corrupt_image(test_src.get_image(0), "fog", 5, profile="cifar-100")
    with pytest.raises(ValueError, match="unknown corruption profile"):
        StreamSpec(profile="nope")


def test_make_c_and_stream_agree_and_record_profile(tmp_path, test_src):
    out = tmp_path / "cc"
    man = make_c("mnist5k", out, corruptions=["fog"], severities=[5], limit_per_class=1, progress=False,
                 profile="cifar-c")
    assert man["profile"] == "cifar-c" and "cifar_c" in man["versions"]["corruptions"]
    with pytest.raises(ValueError, match="profile"):
        make_c("mnist5k", out, corruptions=["fog"], severities=[5], limit_per_class=1, progress=False)
    first = sorted((out / "fog" / "5").glob("*/*.png"))[0]
    idx = int(first.stem)
    png = np.asarray(Image.open(first).convert("RGB"))
    spec = StreamSpec(domains=[("fog", 5)], batch_size=1000, profile="cifar-c")
    assert StreamSpec.from_json(spec.to_json()) == spec
    batch = next(iter_batches(spec, test_src))
    pos = int(np.flatnonzero(batch.sample_indices == idx)[0])
    assert np.array_equal(batch.images[pos], png)
    assert json.loads((out / "manifest.json").read_text())["profile"] == "cifar-c"


def test_bench_cache_is_keyed_by_profile(tmp_path, test_src):
    from mgg_core.bench.data import corrupted_images, synthetic_domains

    idx = np.arange(3)
    a = corrupted_images(test_src, idx, "contrast", 5, 0, tmp_path, "t", profile="imagenet-c")
    b = corrupted_images(test_src, idx, "contrast", 5, 0, tmp_path, "t", profile="cifar-c")
    assert len(list(tmp_path.glob("*.npz"))) == 2 and not np.array_equal(a, b)
    assert np.array_equal(b[1], C.corrupt_image(test_src.get_image(1), "contrast", 5, 0, 1, profile="cifar-c"))
    # a cached read returns the same pixels
    assert np.array_equal(corrupted_images(test_src, idx, "contrast", 5, 0, tmp_path, "t", profile="cifar-c"), b)
    doms = synthetic_domains("mnist5k", "test", ["fog"], 5, 0, tmp_path, indices=idx, profile="cifar-c",
                             tag_profile=True)
    assert doms[0].name == "fog-5@cifar-c"


def test_pretraining_samples_spread_over_severities_and_profiles():
    from collections import Counter

    from mgg_core.pretrain import pretraining_samples

    val = np.arange(0, 4000, 4)
    one = pretraining_samples(4000, 128, 0, val)
    # one severity and profile: the pairs of the original recipe (corruptions in equal shares, same draw)
    rng = np.random.Generator(np.random.PCG64([0, 7]))
    idx = rng.choice(np.setdiff1d(np.arange(4000), val), size=128, replace=False)
    corr = [C.HELDOUT_CORRUPTIONS[i % 4] for i in range(128)]
    rng.shuffle(corr)
    assert [(i, c) for i, (c, _, _) in one] == list(zip(idx.tolist(), corr, strict=True))
    assert {(s, p) for _, (_, s, p) in one} == {(5, "imagenet-c")}
    many = pretraining_samples(4000, 480, 0, val, severities=(3, 4, 5), profiles=("cifar-c", "imagenet-c"))
    counts = Counter(c for _, c in many)
    assert len(counts) == 4 * 3 * 2 and set(counts.values()) == {20}
    assert not set(i for i, _ in many) & set(val.tolist())
