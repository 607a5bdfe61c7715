"""Adaptation does what it claims on a real shifted batch: the bundled MNIST-5k classifiers, real corruptions."""
import numpy as np
import pytest
import torch

from mgg_core.classifier import default_checkpoint, load_classifier
from mgg_core.data.corruptions import corrupt_image
from mgg_core.data.sources import mnist5k
from mgg_core.engine import AdaptationEngine, EngineConfig

GRAD_METHODS = ["tent", "eata", "sar", "deyo", "foa"]


@pytest.fixture(scope="module", params=["resnet", "vit"])
def setup(request):
    clf = load_classifier(default_checkpoint(request.param))
    src = mnist5k("test")
    images = [corrupt_image(src.get_image(i), "gaussian_noise", 3, seed=0, index=i) for i in range(64)]
    x = clf.preprocessor(np.stack(images))
    from mgg_core.pretrain import source_stats_for
    return request.param, clf, x, source_stats_for(clf)


def _mean_entropy(engine, state, x):
    logits = engine.predict(state, x)
    logp = logits.log_softmax(1)
    return float(-(logp.exp() * logp).sum(1).mean())


@pytest.mark.parametrize("method", GRAD_METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "mgg"])
def test_entropy_decreases_on_a_corrupted_batch(setup, method, optimizer):
    kind, clf, x, stats = setup
    cfg = EngineConfig(method=method, optimizer=optimizer, lr=5e-3 if optimizer == "sgd" else None)
    if optimizer == "mgg":
        from mgg_core.pretrain import default_mgg_checkpoint
        cfg.mgg_checkpoint = str(default_mgg_checkpoint(kind))
    engine = AdaptationEngine(clf, cfg, source_stats=stats)
    state = engine.new_state()
    before = _mean_entropy(engine, state, x)
    adapted = sum(engine.step(state, x).adapted for _ in range(5))
    after = _mean_entropy(engine, state, x)
    assert adapted >= 3, f"{method}: only {adapted} of 5 steps were taken"
    assert after < before, f"{kind} {method}+{optimizer}: entropy {before:.4f} -> {after:.4f}"
