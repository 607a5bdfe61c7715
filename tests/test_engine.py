"""AdaptationEngine: parameter selection, exact reset, stream isolation, snapshots, guards."""
import pytest
import timm
import torch
from torch import nn

from mgg_core.engine import AdaptationEngine, EngineConfig, GuardConfig, compute_fisher
from mgg_core.features import compute_source_stats
from mgg_core.guard import SHIFT_FEATURES
from mgg_core.methods import METHODS
from mgg_core.mgg import GradientMemoryLayer
from mgg_core.optim import MGG
from mgg_core.params import select_norm_params

GRAD_METHODS = ["tent", "eata", "sar", "deyo", "foa"]


def _vit():
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=10, img_size=32, patch_size=4).eval()


def _resnet():
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=10).eval()


def _group_norm(num_channels, **kwargs):
    return nn.GroupNorm(8, num_channels)


def _batches(n=4, bs=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, 32, 32, generator=gen) for _ in range(n)]


def _engine(model, method="tent", optimizer="sgd", lr=0.05, guard=None, **method_kwargs):
    stats = None
    if method == "foa":
        probe = AdaptationEngine(model, EngineConfig(method="noadapt"), num_classes=10)
        stats = compute_source_stats(probe.source_features, _batches(2, 16, seed=99))
    opt = MGG(GradientMemoryLayer(seed=0), lr=lr) if optimizer == "mgg" else None
    cfg = EngineConfig(method=method, optimizer=None if optimizer == "mgg" else optimizer, lr=lr,
                       method_kwargs=method_kwargs, guard=guard or GuardConfig())
    return AdaptationEngine(model, cfg, num_classes=10, source_stats=stats, optimizer=opt)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical, NaN where the other is NaN (an unset EMA is NaN on both sides, never on one)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------ parameter selection
@pytest.mark.parametrize("factory,norm_type,expected", [
    (_resnet, nn.BatchNorm2d, None),
    (lambda: timm.create_model("test_resnet", num_classes=10, norm_layer=_group_norm), nn.GroupNorm, None),
    (_vit, nn.LayerNorm, 13 * 2 * 64),   # 6 blocks x (norm1, norm2) + final norm, dim 64
])
def test_trainable_set_is_exactly_the_norm_affine_parameters(factory, norm_type, expected):
    model = factory()
    spec = select_norm_params(model)
    want = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, norm_type)
            for pn, _ in m.named_parameters(recurse=False)}
    assert want and set(spec.names) == want
    assert spec.numel == sum(p.numel() for n, p in model.named_parameters() if n in want)
    if expected is not None:
        assert spec.numel == expected
    # nothing else is adapted: the engine changes only these scalars
    eng = AdaptationEngine(model, EngineConfig(method="tent", optimizer="sgd", lr=0.1), num_classes=10)
    st = eng.new_state()
    eng.step(st, _batches(1)[0])
    changed = (st.theta != eng.theta0).nonzero().numel()
    assert changed > 0
    assert all(not p.requires_grad for p in eng.model.parameters())


def test_model_without_norm_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no normalisation layer"):
        select_norm_params(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)))


# ------------------------------------------------------------------ backbone is shared and frozen
def test_backbone_is_never_modified_by_streams():
    model = _resnet()
    eng = _engine(model, "tent")
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    s1, s2 = eng.new_state(), eng.new_state()
    for x in _batches():
        eng.step(s1, x)
        eng.step(s2, -x)
    after = eng.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_bn_methods_use_test_batch_statistics():
    model = _resnet()
    x = _batches(1, 16)[0] * 3 + 1
    src = AdaptationEngine(model, EngineConfig(method="noadapt"), num_classes=10)
    bn = AdaptationEngine(model, EngineConfig(method="bn"), num_classes=10)
    with torch.no_grad():
        ref_eval = model(x)
        ref_train = timm.create_model("test_resnet", num_classes=10)
        ref_train.load_state_dict(model.state_dict())
        ref_train.train()
        ref_train = ref_train(x)
    assert torch.allclose(src.predict(src.new_state(), x), ref_eval, atol=1e-5)
    assert torch.allclose(bn.predict(bn.new_state(), x), ref_train, atol=1e-4)


# ------------------------------------------------------------------ exact reset, isolation, snapshots
@pytest.mark.parametrize("method,optimizer", [("tent", "sgd"), ("eata", "sgd"), ("sar", "sgd"), ("deyo", "adam"),
                                              ("foa", "mgg")])
def test_reset_is_exact(method, optimizer):
    # filters opened wide (a random 10-class model is never confident) so every method really moves the stream
    kw = {"eata": {"e_margin": 10.0}, "sar": {"e_margin": 10.0},
          "deyo": {"e_margin": 10.0, "plpd_threshold": -1.0}}.get(method, {})
    eng = _engine(_vit(), method, optimizer, **kw)
    fresh = eng.new_state()
    x0 = _batches(1, 8, seed=7)[0]
    expected = eng.predict(fresh, x0)
    st = eng.new_state()
    for x in _batches():
        eng.step(st, x)
    assert st.step > 0, f"{method}: no update was taken, so the reset below proves nothing"
    assert not torch.equal(eng.predict(st, x0), expected)
    eng.reset(st)
    assert torch.equal(eng.predict(st, x0), expected)
    assert st.tensors.keys() == fresh.tensors.keys()
    for k in fresh.tensors:
        _assert_same(st.tensors[k], fresh.tensors[k])
    assert st.step == 0 and st.resets == 1


@pytest.mark.parametrize("method,optimizer", [("tent", "sgd"), ("foa", "mgg"), ("deyo", "sgd")])
def test_interleaved_streams_equal_streams_run_alone(method, optimizer):
    eng = _engine(_resnet(), method, optimizer)
    a_batches, b_batches = _batches(4, seed=1), _batches(4, seed=2)
    alone_a, alone_b = eng.new_state(seed=1), eng.new_state(seed=2)
    out_a = [eng.step(alone_a, x).logits for x in a_batches]
    out_b = [eng.step(alone_b, x).logits for x in b_batches]
    inter_a, inter_b = eng.new_state(seed=1), eng.new_state(seed=2)
    for i in range(4):
        assert torch.equal(eng.step(inter_a, a_batches[i]).logits, out_a[i])
        assert torch.equal(eng.step(inter_b, b_batches[i]).logits, out_b[i])
    for k in alone_a.tensors:
        _assert_same(inter_a.tensors[k], alone_a.tensors[k])
    assert inter_a.step == alone_a.step and inter_b.step == alone_b.step


@pytest.mark.parametrize("method,optimizer", [("foa", "mgg"), ("sar", "sgd"), ("eata", "adam")])
def test_snapshot_restore_continue_equals_never_stopping(tmp_path, method, optimizer):
    kw = {"e_margin": 10.0} if method in ("eata", "sar") else {}
    eng = _engine(_vit(), method, optimizer, **kw)
    batches = _batches(6, seed=3)
    straight = eng.new_state()
    logits_straight = [eng.step(straight, x).logits for x in batches]
    st = eng.new_state()
    for x in batches[:3]:
        eng.step(st, x)
    size = st.save(tmp_path / "s.safetensors")
    assert size > st.nbytes() * 0.9
    restored = eng.load_state(tmp_path / "s.safetensors")
    assert restored.step == st.step and restored.batches == 3
    for i, x in enumerate(batches[3:], start=3):
        assert torch.equal(eng.step(restored, x).logits, logits_straight[i])
    for k in straight.tensors:
        _assert_same(restored.tensors[k], straight.tensors[k])


def test_snapshot_refuses_other_engine(tmp_path):
    eng = _engine(_vit(), "tent")
    st = eng.new_state()
    st.save(tmp_path / "s.safetensors")
    other = _engine(_vit(), "foa", "mgg")
    with pytest.raises(ValueError, match="different engine configuration"):
        other.load_state(tmp_path / "s.safetensors")


def test_state_size_accounts_for_every_tensor():
    eng = _engine(_vit(), "foa", "mgg")
    st = eng.new_state()
    n = eng.spec.numel
    # theta, m, v, W (8x8), b (8) per scalar, + step, guard signals (guard.py: 11 scalars + 3 class histograms
    # + 3 domain-shift descriptor vectors)
    assert st.nbytes() == 4 * (n * (1 + 1 + 1 + 64 + 8) + 11 + 3 * 10 + 3 * SHIFT_FEATURES) + 8
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors.values())


# ------------------------------------------------------------------ guards
def test_non_finite_loss_skips_and_leaves_state_untouched():
    eng = _engine(_vit(), "tent")
    st = eng.new_state()
    eng.step(st, _batches(1)[0])
    before = {k: v.clone() for k, v in st.tensors.items() if not k.startswith("guard.")}
    bad = _batches(1)[0]
    bad[0, 0, 0, 0] = float("nan")
    res = eng.step(st, bad)
    assert not res.adapted and res.skipped_reason == "non_finite_loss" and st.step == 1 and st.skipped == 1
    assert all(torch.equal(st.tensors[k], v) for k, v in before.items())


def test_non_finite_update_is_rejected():
    class Exploding(MGG):
        def update(self, theta, grad, state):
            return theta * float("inf"), state
    eng = AdaptationEngine(_vit(), EngineConfig(method="tent"), num_classes=10,
                           optimizer=Exploding(GradientMemoryLayer()))
    st = eng.new_state()
    theta = st.theta.clone()
    res = eng.step(st, _batches(1)[0])
    assert res.skipped_reason == "non_finite_update" and torch.equal(st.theta, theta) and st.step == 0


def test_collapse_guard_rolls_back_to_anchor_then_source():
    import numpy as np

    from mgg_core.classifier import default_checkpoint, load_classifier
    from mgg_core.data.sources import mnist5k

    clf = load_classifier(default_checkpoint("resnet"))          # a trained model on real, varied digits
    src = mnist5k("test")
    order = np.random.default_rng(0).permutation(len(src))[:64]
    varied = list(clf.preprocessor(np.stack([src.get_image(int(i)) for i in order])).split(16))
    guard = GuardConfig(enabled=True, horizon_images=1, max_class_share=0.99, warmup_images=16,
                        anchor_every_images=32, check_share=0.0)
    eng = AdaptationEngine(clf, EngineConfig(method="tent", optimizer="sgd", lr=0.01, guard=guard))
    st = eng.new_state()
    for x in varied:
        r = eng.step(st, x)
        assert not r.rolled_back and r.adapted
    assert st.anchor is not None and st.anchor_step == 4 and st.top_class_share < 0.99
    anchor_theta = st.anchor["theta"].clone()
    # a batch of one repeated image: every prediction is the same class -> share 1.0 -> rollback to the anchor
    same = varied[0][:1].repeat(16, 1, 1, 1)
    r = eng.step(st, same)
    assert r.rolled_back and r.rollback_reason == "class_collapse" and st.rollbacks == 1
    assert torch.equal(st.theta, anchor_theta) and st.anchor is None and st.step == 4
    # a second collapse before a new healthy anchor goes back to source
    r = eng.step(st, same)
    assert r.rolled_back and st.rollbacks == 2
    assert torch.equal(st.theta, eng.theta0) and st.step == 0


def test_sar_recovery_resets_the_stream():
    eng = _engine(_vit(), "sar", e_margin=10.0, reset_constant=100.0)  # every update triggers recovery
    st = eng.new_state()
    st.annotations["idempotency"] = "[]"      # the service's records survive the engine's own recovery
    r = eng.step(st, _batches(1)[0])
    assert r.adapted and r.reset_reason == "sar_recovery" and st.step == 0 and torch.equal(st.theta, eng.theta0)
    assert st.resets == 1 and st.annotations == {"idempotency": "[]"}


def test_eata_fisher_regulariser_pulls_towards_source():
    model = _vit()
    probe = AdaptationEngine(model, EngineConfig(method="noadapt"), num_classes=10)
    fisher = compute_fisher(probe, _batches(2, 8, seed=11))
    assert fisher.shape == (probe.spec.numel,) and (fisher >= 0).all() and fisher.sum() > 0
    # plain SGD with lr * 2 * alpha = 1: each step pulls theta fully back to source before the entropy step
    common = dict(method="eata", optimizer="sgd", lr=0.01, optimizer_kwargs={"momentum": 0.0})
    hp = {"e_margin": 2.31, "d_margin": 10.0}   # every sample passes (entropy <= ln 10), weights ~1
    free = AdaptationEngine(model, EngineConfig(**common, method_kwargs=hp), num_classes=10)
    tied = AdaptationEngine(model, EngineConfig(**common, method_kwargs={**hp, "fisher_alpha": 50.0}),
                            num_classes=10, fisher=torch.ones_like(fisher))
    sf, stt = free.new_state(), tied.new_state()
    for x in _batches(4):
        assert free.step(sf, x).adapted and tied.step(stt, x).adapted
    assert (stt.theta - tied.theta0).norm() < 0.6 * (sf.theta - free.theta0).norm()


def test_registry_and_bad_hyperparameters():
    assert set(METHODS) >= {"noadapt", "bn", "tent", "eata", "sar", "deyo", "foa"}
    with pytest.raises(ValueError, match="unknown method"):
        EngineConfig and AdaptationEngine(_vit(), EngineConfig(method="nope"), num_classes=10)
    with pytest.raises(ValueError, match="no hyper-parameter"):
        AdaptationEngine(_vit(), EngineConfig(method="tent", method_kwargs={"rho": 1}), num_classes=10)
    with pytest.raises(ValueError, match="needs an MGG checkpoint"):
        AdaptationEngine(_vit(), EngineConfig(method="tent", optimizer="mgg"), num_classes=10)


def test_registries_reject_duplicate_names_and_keep_order():
    from mgg_core.methods import Method, register
    from mgg_core.optim import OPTIMIZERS, OptimInfo, register_optimizer
    from mgg_core.registry import Registry

    assert METHODS.names()[:7] == ["noadapt", "bn", "tent", "eata", "sar", "deyo", "foa"]
    with pytest.raises(ValueError, match="duplicate method name 'tent'"):
        register(type("Tent2", (Method,), {"name": "tent"}))
    with pytest.raises(ValueError, match="duplicate optimizer name 'sgd'"):
        register_optimizer(OptimInfo("sgd", lambda **kw: None))
    assert OPTIMIZERS.names() == ["sgd", "adam", "mgg"]
    reg: Registry[int] = Registry("thing")
    reg.add("b", 2)
    reg.add("a", 1)
    assert reg.names() == ["b", "a"] and reg.get("A") == 1
    with pytest.raises(ValueError, match=r"unknown thing 'c'; choose from \['a', 'b'\]"):
        reg.get("c")


def test_bench_lists_come_from_the_registries():
    from mgg_core.bench import ALL_METHODS, METHOD_PARTS, REFERENCE_LR

    assert ALL_METHODS == ("noadapt", "bn", "tent", "eata", "sar", "deyo", "foa", "come", "roid", "mgg")
    assert METHOD_PARTS == {"noadapt": ("noadapt", None), "bn": ("bn", None), "tent": ("tent", "sgd"),
                            "eata": ("eata", "sgd"), "sar": ("sar", "sgd"), "deyo": ("deyo", "sgd"),
                            "foa": ("foa", "sgd"), "come": ("come", "sgd"), "roid": ("roid", "sgd"),
                            "mgg": ("foa", "mgg")}
    assert {m: 1e-3 for m in ("tent", "eata", "sar", "deyo", "foa", "come", "roid", "mgg")} == REFERENCE_LR


def test_reasons_print_as_their_historical_strings():
    import json

    from mgg_core.reasons import ResetReason, RollbackReason, SkipReason

    assert json.dumps([SkipReason.NON_FINITE_LOSS, RollbackReason.CLASS_COLLAPSE, ResetReason.SAR_RECOVERY]) == \
        '["non_finite_loss", "class_collapse", "sar_recovery"]'
    assert str(SkipReason.NO_RELIABLE_SAMPLES) == f"{SkipReason.NO_RELIABLE_SAMPLES}" == "no_reliable_samples"
    assert SkipReason.ADAPTATION_DISABLED == "adaptation_disabled"


def test_scaled_reference_hyperparameters():
    import math
    eata = METHODS["eata"](num_classes=1000)
    assert eata.e_margin == pytest.approx(0.4 * math.log(1000)) and eata.d_margin == pytest.approx(0.05)
    assert METHODS["eata"](num_classes=10).e_margin == pytest.approx(0.4 * math.log(10))
    assert METHODS["deyo"](num_classes=10).e_margin == pytest.approx(0.5 * math.log(10))
    assert METHODS["sar"](num_classes=1000).reset_constant == pytest.approx(0.2)


def test_mgg_step_size_comes_from_its_card_unless_given(tmp_path):
    import json
    ckpt = tmp_path / "mgg.safetensors"
    GradientMemoryLayer(seed=0).save(ckpt, card={"deployment": {"lr": 0.02}})
    cfg = EngineConfig(method="tent", optimizer="mgg", mgg_checkpoint=str(ckpt))
    eng = AdaptationEngine(_vit(), cfg, num_classes=10)
    assert eng.optimizer.lr == 0.02 and eng.describe()["optimizer"]["lr"] == 0.02
    eng = AdaptationEngine(_vit(), EngineConfig(method="tent", optimizer="mgg", lr=0.5, mgg_checkpoint=str(ckpt)),
                           num_classes=10)
    assert eng.optimizer.lr == 0.5
    ckpt.with_suffix(".json").write_text(json.dumps({}))
    cfg = EngineConfig(method="tent", optimizer="mgg", mgg_checkpoint=str(ckpt))
    eng = AdaptationEngine(_vit(), cfg, num_classes=10)
    assert eng.optimizer.lr == 1e-3


def test_step_many_equals_separate_steps_and_refuses_a_stream_twice():
    eng = _engine(_resnet(), "tent", "sgd")
    xs = _batches(3, seed=5)
    alone = [eng.new_state(seed=i) for i in range(3)]
    expected = [eng.step(st, x).logits for st, x in zip(alone, xs, strict=True)]
    many = [eng.new_state(seed=i) for i in range(3)]
    results = eng.step_many(list(zip(many, xs, strict=True)))
    for res, want, st, ref in zip(results, expected, many, alone, strict=True):
        # fused (vmapped) kernels round differently from the plain ones: within 1e-5 (tests/test_fused.py)
        torch.testing.assert_close(res.logits, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(res.logits.argmax(1), want.argmax(1))
        assert st.step == ref.step == 1
    with pytest.raises(ValueError, match="more than once"):
        eng.step_many([(many[0], xs[0]), (many[0], xs[1])])
    assert many[0].step == 1, "a refused call changes no state"


# ------------------------------------------------------------------ state groups by the engine's layout
def test_engine_reads_state_groups_by_its_layout_and_falls_back_for_older_states():
    eng = AdaptationEngine(_resnet(), EngineConfig(method="eata", optimizer="sgd", bn_stats="ema",
                                                   guard=GuardConfig(enabled=True)), num_classes=10)
    state = eng.new_state()
    eng.step(state, _batches(1, 4)[0])
    for prefix in ("guard", "norm", "method", "opt"):
        fast, scan = eng._group(state, prefix), state.group(prefix)
        assert fast.keys() == scan.keys() and all(fast[k] is scan[k] for k in scan), prefix
    old = state.clone()
    del old.tensors["guard.shift_fast"]          # a state from before the domain-shift signal
    assert eng._group(old, "guard").keys() == old.group("guard").keys()
    assert "shift_fast" not in eng._group(old, "guard")
