"""Data layer: sources, corruptions, make-c + ImageNet-C reader, streams."""
from __future__ import annotations

import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from PIL import Image

from mgg_core.data import corruptions as C
from mgg_core.data.cli import make_c
from mgg_core.data.imagenet_c import ImageNetC, is_imagenet_c_tree
from mgg_core.data.sources import ImageFolderSource, mnist5k, open_source, stratified_split
from mgg_core.data.streams import (
    StreamSpec,
    default_stream_spec,
    dirichlet_order,
    iter_batches,
    stream_plan,
)

# corruptions whose output does not depend on any random draw
DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate"}


@pytest.fixture(scope="module")
def test_src():
    return mnist5k("test")


# ----------------------------------------------------------------------------------------------- sources

def test_mnist5k_is_real_fixed_and_stratified():
    tr, te, al = mnist5k("train"), mnist5k("test"), mnist5k("all")
    assert (len(tr), len(te), len(al)) == (4000, 1000, 5000)
    assert np.bincount(te.labels).tolist() == [100] * 10
    assert np.bincount(tr.labels).tolist() == [400] * 10
    assert te.class_names == [str(i) for i in range(10)]
    img = te.get_image(0)
    assert img.shape == (28, 28) and img.dtype == np.uint8
    # MNIST digits: dark background, bright strokes, mean intensity ~ 0.13
    assert 0.09 < al.images.mean() / 255 < 0.17
    assert al.images[:, 0, :].max() < 60  # top row nearly empty
    # train and test are disjoint
    tr_set = {x.tobytes() for x in tr.images}
    assert not any(x.tobytes() in tr_set for x in te.images)
    d = te.describe()
    assert "CC BY-SA 3.0" in d["licence"] and "LeCun" in d["origin"]
    # a different split seed gives a different but equally stratified split
    other = mnist5k("test", seed=1)
    assert np.bincount(other.labels).tolist() == [100] * 10
    assert not np.array_equal(other.images, te.images)


def test_stratified_split_deterministic():
    labels = np.repeat(np.arange(4), 10)
    a = stratified_split(labels, test_fraction=0.3, seed=3)
    b = stratified_split(labels, test_fraction=0.3, seed=3)
    c = stratified_split(labels, test_fraction=0.3, seed=4)
    assert np.array_equal(a[1], b[1]) and not np.array_equal(a[1], c[1])
    assert np.bincount(labels[a[1]]).tolist() == [3] * 4
    assert sorted(np.concatenate(a).tolist()) == list(range(40))


def test_image_folder_any_pil_format(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "cat").mkdir()
    (tmp_path / "ant").mkdir()
    rgb = rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "cat" / "a.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "cat" / "b.bmp")
    rgba = np.dstack([rgb, np.full((12, 10), 0, np.uint8)])  # fully transparent -> black
    Image.fromarray(rgba).save(tmp_path / "ant" / "c.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "ant" / "d.gif")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "ant" / "e.tif")
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(tmp_path)
    assert src.class_names == ["ant", "cat"]
    assert src.labels.tolist() == [0, 0, 0, 1, 1]
    imgs = [src.get_image(i) for i in range(len(src))]
    assert all(im.dtype == np.uint8 for im in imgs)
    assert imgs[0].shape == (12, 10, 3) and not imgs[0].any()  # transparent composited over black
    assert imgs[1].shape == (12, 10, 3)  # palette -> RGB
    assert np.array_equal(imgs[2], rgb[:, :, 0])  # 16-bit scaled back to 8 bits
    assert np.array_equal(imgs[3], rgb)
    assert np.array_equal(imgs[4], rgb[:, :, 0])
    # a plain folder is split deterministically and stratified
    tr, te = open_source(tmp_path, "train"), open_source(tmp_path, "test")
    assert len(tr) + len(te) == 5 and set(te.labels.tolist()) == {0, 1}


# ----------------------------------------------------------------------------------------------- corruptions

def test_corruption_lists():
    assert len(C.TEST_CORRUPTIONS) == 15 and len(C.HELDOUT_CORRUPTIONS) == 4
    assert not set(C.TEST_CORRUPTIONS) & set(C.HELDOUT_CORRUPTIONS)
    from imagecorruptions import get_corruption_names
    assert list(C.TEST_CORRUPTIONS) == get_corruption_names("common")
    assert set(C.HELDOUT_CORRUPTIONS) == set(get_corruption_names("validation"))


@pytest.mark.parametrize("name", C.ALL_CORRUPTIONS)
def test_each_corruption_on_a_28px_digit(test_src, name):
    digit = test_src.get_image(7)
    clean = C.prepare_image(digit)
    out = C.corrupt_image(digit, name, 5, seed=0, index=7)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - clean).mean() > 1.0  # it really corrupts
    again = C.corrupt_image(digit, name, 5, seed=0, index=7)
    assert np.array_equal(out, again)
    other = C.corrupt_image(digit, name, 5, seed=1, index=7)
    if name in DETERMINISTIC:
        assert np.array_equal(out, other)
    else:
        assert not np.array_equal(out, other)
        assert not np.array_equal(out, C.corrupt_image(digit, name, 5, seed=0, index=8))


def test_corruption_leaves_global_rng_alone(test_src):
    np.random.seed(1234)
    random.seed(99)
    np_before = np.random.get_state()[1].copy()
    py_before = random.getstate()
    C.corrupt_image(test_src.get_image(0), "gaussian_noise", 3, seed=5, index=0)
    C.corrupt_image(test_src.get_image(0), "frost", 3, seed=5, index=0)
    assert np.array_equal(np.random.get_state()[1], np_before)
    assert random.getstate() == py_before


def test_severity_increases_damage(test_src):
    digit = test_src.get_image(3)
    clean = C.prepare_image(digit).astype(float)
    err = [np.abs(C.corrupt_image(digit, "gaussian_noise", s, 0, 3) - clean).mean() for s in C.SEVERITIES]
    assert err == sorted(err) and err[-1] > 2 * err[0]
    with pytest.raises(ValueError):
        C.corrupt_image(digit, "gaussian_noise", 6)
    with pytest.raises(ValueError):
        C.corrupt_image(digit, "no_such_corruption", 1)


def test_prepare_image_sizes():
    assert C.prepare_image(np.zeros((28, 28), np.uint8)).shape == (32, 32, 3)
    assert C.prepare_image(np.zeros((20, 60, 3), np.uint8)).shape == (32, 96, 3)
    assert C.prepare_image(np.zeros((40, 50, 4), np.uint8)).shape == (40, 50, 3)
    big = np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8)
    assert np.array_equal(C.prepare_image(big), big)


# ----------------------------------------------------------------------------------------------- make-c + reader

CORR_SMALL = ["gaussian_noise", "fog", "pixelate"]


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnist5k-c")
    manifest = make_c("mnist5k", out, corruptions=CORR_SMALL, severities=[1, 5], split="test", seed=3,
                      limit_per_class=2, progress=False)
    return out, manifest


def test_make_c_writes_layout_and_manifest(small_tree, test_src):
    out, manifest = small_tree
    assert manifest["images_per_domain"] == 20 and manifest["per_class"] == [2] * 10
    assert manifest["seed"] == 3 and manifest["split"] == "test"
    assert "imagecorruptions" in manifest["versions"] and "torch" in manifest["versions"]
    assert json.loads((out / "manifest.json").read_text())["domains"] == [[c, s] for c in sorted(CORR_SMALL) for s in (1, 5)]
    pngs = sorted(out.glob("*/*/*/*.png"))
    assert len(pngs) == 3 * 2 * 20
    # file = the on-the-fly corruption of that source index (lossless PNG)
    p = out / "fog" / "5" / "4"
    f = sorted(p.glob("*.png"))[0]
    i = int(f.stem)
    assert test_src.labels[i] == 4
    assert np.array_equal(np.asarray(Image.open(f)), C.corrupt_image(test_src.get_image(i), "fog", 5, seed=3, index=i))


def test_imagenet_c_reader(small_tree, test_src):
    out, _ = small_tree
    assert is_imagenet_c_tree(out)
    tree = ImageNetC(out)
    assert tree.corruptions() == sorted(CORR_SMALL)
    assert tree.severities("fog") == [1, 5]
    assert tree.class_names == [str(i) for i in range(10)]
    dom = tree.domain("pixelate", 5)
    assert len(dom) == 20 and np.bincount(dom.labels).tolist() == [2] * 10
    img, label = dom[5]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    i = int(os.path.basename(dom.paths[5]).split(".")[0])
    assert label == test_src.labels[i]
    assert len(tree) == 120
    with pytest.raises(KeyError):
        tree.domain("snow", 5)
    # an explicit class-index mapping (reversed order) relabels consistently
    rev = ImageNetC(out, class_index=[str(i) for i in range(9, -1, -1)])
    assert rev.domain("pixelate", 5).labels.tolist() == (9 - dom.labels).tolist()


def test_reader_on_plain_imagenet_c_layout(tmp_path):
    # real ImageNet-C: wnid folders, JPEGs, no manifest
    rng = np.random.default_rng(0)
    for c in ("snow", "brightness"):
        for s in (1, 3):
            for wnid in ("n02", "n01"):
                d = tmp_path / c / str(s) / wnid
                d.mkdir(parents=True)
                for k in range(3):
                    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"ILSVRC_{k}.JPEG")
    assert is_imagenet_c_tree(tmp_path)
    assert not is_imagenet_c_tree(tmp_path / "snow")  # a severity/<class> level is not a tree
    tree = ImageNetC(tmp_path)
    assert tree.corruptions() == ["brightness", "snow"] and tree.severities("snow") == [1, 3]
    assert tree.class_names == ["n01", "n02"]
    dom = tree.domain("snow", 3)
    assert dom.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert dom.get_image(0).shape == (40, 40, 3)
    tree2 = ImageNetC(tmp_path, class_index={"n02": 0, "n01": 1})
    assert tree2.domain("snow", 3).labels.tolist() == [1, 1, 1, 0, 0, 0]


def test_make_c_resumes_and_guards_protocol(tmp_path, test_src):
    from mgg_core.cli import main

    out = tmp_path / "c"
    argv = ["data", "make-c", "--data", "mnist5k", "--out", str(out), "--corruptions", "contrast", "shot_noise",
            "--severities", "2", "--limit-per-class", "1", "--seed", "0", "--no-progress"]
    assert main(argv) == 0
    victim = sorted((out / "shot_noise" / "2").glob("*/*.png"))[0]
    victim.unlink()
    (out / "shot_noise" / "2" / ".complete").unlink()
    keep = sorted((out / "contrast" / "2").glob("*/*.png"))[0]
    mtime = keep.stat().st_mtime_ns
    manifest = make_c("mnist5k", out, corruptions=["contrast", "shot_noise"], severities=[2], seed=0,
                      limit_per_class=1, progress=False)
    assert manifest["last_run"] == {"written_domains": 1, "skipped_complete_domains": 1,
                                    "seconds": manifest["last_run"]["seconds"]}
    assert victim.is_file() and keep.stat().st_mtime_ns == mtime
    i = int(victim.stem)
    assert np.array_equal(np.asarray(Image.open(victim)), C.corrupt_image(test_src.get_image(i), "shot_noise", 2, 0, i))
    with pytest.raises(ValueError, match="different"):
        make_c("mnist5k", out, corruptions=["contrast"], severities=[2], seed=1, limit_per_class=1, progress=False)


# ----------------------------------------------------------------------------------------------- streams

def _check_coverage(spec, source, per_domain):
    seen = []
    sizes = []
    for b in iter_batches(spec, source):
        assert len(b.labels) == len(b.domains) == len(b.sample_indices) == len(b.images)
        assert np.asarray(b.images).dtype == np.uint8 and np.asarray(b.images).shape[1:] == (32, 32, 3)
        assert np.array_equal(b.labels, source.labels[b.sample_indices])
        seen.extend(zip(b.domains, b.sample_indices.tolist()))
        sizes.append(len(b))
    assert len(seen) == len(set(seen)) == per_domain * len(spec.domains)
    if spec.order == "sequential" and spec.reset == "per_domain":
        # batches never straddle a domain boundary: each domain ends in its own (possibly short) batch
        full, rest = divmod(per_domain, spec.batch_size)
        assert sizes == ([spec.batch_size] * full + ([rest] if rest else [])) * len(spec.domains)
    else:
        assert all(s == spec.batch_size for s in sizes[:-1])
    return seen, sizes


@pytest.mark.parametrize("order", ["sequential", "mixed"])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_stream_covers_every_sample_once(test_src, order, batch_size):
    spec = StreamSpec(domains=["clean", ("gaussian_noise", 5), ("contrast", 3)], order=order, batch_size=batch_size,
                      reset="never" if order == "mixed" else "per_domain", limit=100, seed=1)
    seen, sizes = _check_coverage(spec, test_src, 100)
    per_dom = {}
    for d, i in seen:
        per_dom.setdefault(d, set()).add(i)
    assert set(per_dom) == {"clean", "gaussian_noise-5", "contrast-3"}
    assert all(len(v) == 100 for v in per_dom.values())
    assert per_dom["clean"] == per_dom["contrast-3"]  # the same (stratified) subset in every domain
    assert np.bincount(test_src.labels[sorted(per_dom["clean"])]).tolist() == [10] * 10
    if order == "sequential":
        # domain after domain, in order; batches never span domains
        order_seen = [d for d, _ in seen]
        assert order_seen == ["clean"] * 100 + ["gaussian_noise-5"] * 100 + ["contrast-3"] * 100
    else:
        first = [d for d, _ in seen[:60]]
        assert len(set(first)) == 3  # interleaved


def test_full_default_plan_covers_test_split(test_src):
    spec = default_stream_spec()
    assert spec.batch_size == 64 and spec.reset == "per_domain" and len(spec.domains) == 15
    assert all(s == 5 for _, s in spec.domains)
    doms, batches = stream_plan(spec, test_src)
    assert len(batches) == 15 * 16  # ceil(1000 / 64) per domain
    pairs = np.concatenate([d * 10_000 + i for d, i in batches])
    assert len(np.unique(pairs)) == len(pairs) == 15_000
    flags = [b.reset_before for b in iter_batches(StreamSpec(domains=spec.domains[:2], limit=130), test_src)]
    assert flags == [False, False, False, True, False, False]


def test_stream_reset_every_and_determinism(test_src):
    spec = StreamSpec(domains=["clean"], batch_size=10, reset=("every", 4), limit=100, seed=7)
    batches = list(iter_batches(spec, test_src))
    assert [b.reset_before for b in batches] == [i > 0 and i % 4 == 0 for i in range(10)]
    again = list(iter_batches(spec, test_src))
    assert all(np.array_equal(a.sample_indices, b.sample_indices) and np.array_equal(a.images, b.images)
               for a, b in zip(batches, again))
    other = list(iter_batches(StreamSpec(domains=["clean"], batch_size=10, reset=("every", 4), limit=100, seed=8), test_src))
    assert not np.array_equal(np.concatenate([b.sample_indices for b in batches]),
                              np.concatenate([b.sample_indices for b in other]))
    # start= resumes a stream without changing its batches
    tail = list(iter_batches(spec, test_src, start=7))
    assert [b.index for b in tail] == [7, 8, 9] and np.array_equal(tail[0].images, batches[7].images)


def test_sample_pixels_independent_of_batching(test_src):
    a = StreamSpec(domains=[("impulse_noise", 4)], batch_size=1, limit=30, seed=2)
    b = StreamSpec(domains=[("impulse_noise", 4)], batch_size=16, limit=30, seed=2, label_shift=0.1)
    pix_a = {int(bt.sample_indices[0]): bt.images[0] for bt in iter_batches(a, test_src)}
    for bt in iter_batches(b, test_src):
        for i, im in zip(bt.sample_indices.tolist(), bt.images):
            assert np.array_equal(pix_a[i], im)


def _majority_share(spec, source):
    _, batches = stream_plan(spec, source)
    full = [i for _, i in batches if len(i) == spec.batch_size]
    return float(np.mean([np.bincount(source.labels[i], minlength=10).max() / len(i) for i in full]))


def test_label_shift_follows_alpha(test_src):
    shares = {}
    for alpha in (None, 0.01, 1.0, 1000.0):
        vals = [_majority_share(StreamSpec(domains=["clean"], batch_size=64, label_shift=alpha, seed=s), test_src)
                for s in range(4)]
        shares[alpha] = float(np.mean(vals))
    # i.i.d. batches of 64 over 10 balanced classes: the majority class holds ~16%
    assert 0.13 < shares[None] < 0.20
    assert shares[1000.0] < 0.20 and abs(shares[1000.0] - shares[None]) < 0.03  # large alpha ~ i.i.d.
    assert shares[0.01] > 0.45  # small alpha: batches dominated by one or two classes
    assert shares[0.01] > shares[1.0] > shares[1000.0]
    # label shift still covers every sample exactly once
    _, batches = stream_plan(StreamSpec(domains=["clean", ("fog", 5)], label_shift=0.05), test_src)
    pairs = np.concatenate([d * 10_000 + i for d, i in batches])
    assert len(np.unique(pairs)) == len(pairs) == 2000


def test_dirichlet_order_is_a_permutation():
    labels = np.repeat(np.arange(5), 37)
    perm = dirichlet_order(labels, 0.1, np.random.default_rng(0))
    assert sorted(perm.tolist()) == list(range(len(labels)))


def test_stream_spec_json_and_validation():
    spec = StreamSpec(domains=["clean", ("fog", 3), "snow-5"], order="mixed", batch_size=1, reset=("every", 5),
                      label_shift=0.5, seed=4, limit=10)
    text = spec.to_json()
    back = StreamSpec.from_json(text)
    assert back == spec and back.domains == ["clean", ("fog", 3), ("snow", 5)] and back.reset == ("every", 5)
    assert json.loads(text)["domains"] == ["clean", ["fog", 3], ["snow", 5]]
    assert spec.domain_names == ["clean", "fog-3", "snow-5"]
    assert StreamSpec.from_json(default_stream_spec().to_json()) == default_stream_spec()
    for bad in (dict(batch_size=0), dict(order="random"), dict(reset="sometimes"), dict(reset=("every", 0)),
                dict(label_shift=0.0), dict(domains=[("fog", 6)]), dict(domains=["clean", "clean"]),
                dict(order="mixed", reset="per_domain")):
        with pytest.raises(ValueError):
            StreamSpec(**bad)
    with pytest.raises(ValueError):
        StreamSpec.from_dict({"domains": ["clean"], "colour": "red"})


def test_stream_from_generated_tree(small_tree, test_src):
    out, _ = small_tree
    spec = StreamSpec(domains=[("fog", 5), ("pixelate", 1)], batch_size=7, data=str(out), seed=3)
    batches = list(iter_batches(spec))  # opens the tree named by spec.data
    assert sum(len(b) for b in batches) == 40
    tree = ImageNetC(out)
    b = batches[0]
    dom = tree.domain("fog", 5)
    i = int(b.sample_indices[0])
    src_index = int(os.path.basename(dom.paths[i]).split(".")[0])
    # the tree's pixels equal the on-the-fly corruption with the same seed
    assert np.array_equal(b.images[0], C.corrupt_image(test_src.get_image(src_index), "fog", 5, seed=3, index=src_index))
    with pytest.raises(ValueError):
        list(iter_batches(StreamSpec(domains=["clean"], data=str(out))))
