"""Diagnostic only (session 7): per-request trace of the default engine on a continual stream (the guard's state and
decisions, the adapted and source accuracy) for chosen domains. Usage:
python trace_continual.py SHIFT(none|0.1) DOMAIN_PREFIX... [--set K=JSON ...] [--seed S]; env TRACE_GUARD: GuardConfig
overrides as JSON"""
import dataclasses, json, os, sys
from pathlib import Path
import torch
sys.path.insert(0, "scripts")
from smallbatch_continual import continual_spec, load_batches
from smallbatch_sweep import _parse_set, engine_variant, load_default_runtime
from mgg_core.guard import source_diversity

args = sys.argv[1:]
sets = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
pos = [a for i, a in enumerate(args) if not a.startswith("--") and (i == 0 or args[i - 1] not in ("--set", "--seed"))]
shift, doms = pos[0], pos[1:]
torch.set_num_threads(1)
rt = load_default_runtime("resnet")
over = _parse_set(sets)
if os.environ.get("TRACE_GUARD"):
    over["guard"] = dataclasses.replace(rt.engine.config.guard, **json.loads(os.environ["TRACE_GUARD"]))
eng = engine_variant(rt, **over)
batches = load_batches(continual_spec(None if shift == "none" else float(shift), seed), rt.preprocessor)
state = eng.new_state(seed=0)
for i, (dom, x, y) in enumerate(batches):
    held = float(state.tensors["guard.hold"])
    res = eng.step(state, x)
    if not any(dom.startswith(d) for d in doms):
        continue
    t = state.tensors
    sp = eng.source_predict(x).argmax(1)
    pred = res.logits.argmax(1)
    print(f"{i:4d} {dom[:12]:12s} held={held:5.0f} a={int((pred == y).sum()):2d} s={int((sp == y).sum()):2d} "
          f"cls={sorted(set(y.tolist()))} dS={source_diversity(t['guard.source_hist']):.2f} "
          f"dA={source_diversity(t['guard.adapted_hist']):.2f} agr={float(t['guard.agreement']):.3f} "
          f"gap={float(t['guard.entropy_gap']):+.3f} img={state.images} rb={res.rollback_reason} rel={res.hold_released}")
