"""Adaptation does what it claims on real shifted data: the bundled MNIST-5k classifiers, real corruptions.

Each method adapts on a short stream of distinct corrupted batches; entropy is measured on a held-out corrupted
batch of the same shift (a repeated single batch would be unfair to EATA, whose redundancy filter is built to
drop samples like the ones it has already seen)."""
import numpy as np
import pytest

from mgg_core.classifier import default_checkpoint, load_classifier
from mgg_core.data.corruptions import corrupt_image
from mgg_core.data.sources import mnist5k
from mgg_core.engine import AdaptationEngine, EngineConfig

GRAD_METHODS = ["tent", "eata", "sar", "deyo", "foa"]


@pytest.fixture(scope="module", params=["resnet", "vit"])
def setup(request):
    clf = load_classifier(default_checkpoint(request.param))
    src = mnist5k("test")
    order = np.random.default_rng(0).permutation(len(src))[: 6 * 64]   # the split is sorted by class
    images = [corrupt_image(src.get_image(int(i)), "gaussian_noise", 3, seed=0, index=int(i)) for i in order]
    x = clf.preprocessor(np.stack(images))
    from mgg_core.assets import source_stats_for
    # five distinct batches to adapt on (a short stream), one held-out batch to measure on
    return request.param, clf, list(x[: 5 * 64].split(64)), x[5 * 64:], source_stats_for(clf)


def _mean_entropy(engine, state, x):
    logits = engine.predict(state, x)
    logp = logits.log_softmax(1)
    return float(-(logp.exp() * logp).sum(1).mean())


@pytest.mark.parametrize("method", GRAD_METHODS)
@pytest.mark.parametrize("optimizer", ["sgd", "mgg"])
def test_entropy_decreases_on_a_corrupted_batch(setup, method, optimizer):
    kind, clf, stream, held_out, stats = setup
    cfg = EngineConfig(method=method, optimizer=optimizer, lr=5e-3 if optimizer == "sgd" else None)
    if optimizer == "mgg":
        from mgg_core.assets import default_mgg_checkpoint
        cfg.mgg_checkpoint = str(default_mgg_checkpoint(kind))
    engine = AdaptationEngine(clf, cfg, source_stats=stats)
    state = engine.new_state()
    before = _mean_entropy(engine, state, held_out)
    adapted = sum(engine.step(state, x).adapted for x in stream)
    after = _mean_entropy(engine, state, held_out)
    assert adapted >= 3, f"{method}: only {adapted} of 5 steps were taken"
    assert after < before, f"{kind} {method}+{optimizer}: entropy {before:.4f} -> {after:.4f}"
