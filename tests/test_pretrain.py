"""mgg pretrain: the meta-gradient reaches the GML weights; checkpoint + card are written; resume is exact."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import write_random_classifier

from mgg_core.mgg import GradientMemoryLayer


@pytest.fixture(scope="module")
def clf_path(tmp_path_factory):
    from mgg_core.assets import source_stats_for, stats_path_for
    from mgg_core.classifier import load_classifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    path = write_random_classifier(tmp_path_factory.mktemp("clf"))
    source_stats_for(load_classifier(path), write=True)
    assert stats_path_for(path).is_file()
    yield path
    torch.set_num_threads(threads)


def test_meta_gradient_reaches_every_gml_weight(clf_path):
    from mgg_core.assets import source_stats_for
    from mgg_core.classifier import load_classifier
    from mgg_core.engine import AdaptationEngine, EngineConfig
    from mgg_core.optim import MGG
    from mgg_core.pretrain import _foa_loss

    clf = load_classifier(clf_path)
    eng = AdaptationEngine(clf, EngineConfig(method="foa", optimizer="sgd"), source_stats=source_stats_for(clf))
    gml = GradientMemoryLayer(seed=0)
    opt = MGG(gml, lr=1e-2)
    gml.requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen)
    theta = eng.theta0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_foa_loss(eng, theta, x0), theta)
    state = opt.init_state(eng.theta0, memory_in_graph=True)
    u, _ = opt.direction(g, state, detach_memory=False)
    # the same direction as the deployed optimizer computes
    with torch.no_grad():
        u_dep, _ = opt.direction(g, opt.init_state(eng.theta0))
    torch.testing.assert_close(u.detach(), u_dep)
    meta_loss = _foa_loss(eng, eng.theta0 - 1e-2 * u, x1)
    meta_loss.backward()
    for name, p in gml.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no meta-gradient reaches {name}"


def test_pretrain_writes_checkpoint_and_card_and_resumes_exactly(clf_path, tmp_path):
    from mgg_core.pretrain import pretrain, state_path_for

    kw = dict(classifier=str(clf_path), samples=12, batch_size=2, meta_lr=1e-2, alpha_train=1e-2, val_lr=1e-2,
              val_images=64, max_steps_per_epoch=3, cache_dir=tmp_path / "cache", progress=False, quiet=True)
    init = GradientMemoryLayer(seed=0).state_dict()

    full = tmp_path / "full.safetensors"
    card = pretrain(out=full, epochs=2, **kw)
    assert full.is_file() and full.with_suffix(".json").is_file()
    on_disk = json.loads(full.with_suffix(".json").read_text())
    assert on_disk == json.loads(json.dumps(card))
    for key in ("classifier", "data", "training", "best_epoch", "best_val_accuracy", "versions", "history", "deployment"):
        assert key in card
    assert card["classifier"]["sha256"] and card["data"]["samples"] == 12
    assert card["data"]["corruptions"] == ["speckle_noise", "spatter", "gaussian_blur", "saturate"]
    assert card["training"]["alpha_train"] == 1e-2 and card["training"]["unroll"] == 1
    assert [h["epoch"] for h in card["history"]] == [0, 1, 2]
    assert all(h["meta_grad_norm"] > 0 for h in card["history"][1:])
    # the trained weights moved away from the initial GML
    gml_full = GradientMemoryLayer.load(full)
    st = torch.load(state_path_for(full), weights_only=False)
    assert any(not torch.equal(st["gml"][k], init[k]) for k in init)

    # interrupted after epoch 1, resumed to epoch 2: the same per-epoch state as the uninterrupted run
    part = tmp_path / "part.safetensors"
    pretrain(out=part, epochs=1, **kw)
    assert json.loads(part.with_suffix(".json").read_text())["history"][-1]["epoch"] == 1
    card2 = pretrain(out=part, epochs=2, resume=True, **kw)
    assert [h["epoch"] for h in card2["history"]] == [0, 1, 2]
    st2 = torch.load(state_path_for(part), weights_only=False)
    for k in st["gml"]:
        torch.testing.assert_close(st2["gml"][k], st["gml"][k])
    assert card2["best_epoch"] == card["best_epoch"]
    gml_part = GradientMemoryLayer.load(part)
    for k, v in gml_full.state_dict().items():
        torch.testing.assert_close(gml_part.state_dict()[k], v)


def test_unroll_longer_than_one_and_the_loss_weight_travel_with_the_checkpoint(clf_path, tmp_path):
    from mgg_core.assets import source_stats_for
    from mgg_core.bench import Setup, build_engine
    from mgg_core.classifier import load_classifier
    from mgg_core.pretrain import pretrain

    out = tmp_path / "u3.safetensors"
    card = pretrain(classifier=str(clf_path), out=out, epochs=1, samples=12, unroll=3, lam=0.0,
                    alpha_train=1e-2, val_images=32, max_steps_per_epoch=5, cache_dir=tmp_path / "cache",
                    progress=False, quiet=True)
    assert card["training"]["unroll"] == 3
    assert card["history"][1]["meta_grad_norm"] > 0
    assert card["loss"]["lambda"] == 0.0
    # the bench deploys MGG with the loss it was meta-trained on
    clf = load_classifier(clf_path)
    eng = build_engine(Setup(classifier=clf, source_stats=source_stats_for(clf), mgg_checkpoint=str(out)), "mgg", 1e-2)
    assert eng.method.lam == 0.0 and eng.optimizer.name == "mgg"
