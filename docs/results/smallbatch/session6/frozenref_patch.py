"""Diagnostic only (session 6, round 2): the shift-triggered warm-up (bn_warmup_shift) with a frozen reference,
as the guard's hold release has: the mean and mean square of the pixel descriptor over the first FZ_REF (32) images
after each warm-up restart (and at the stream start), then frozen; a shift is a feature of the guard's fast EMA
(guard.shift_fast) more than bn_warmup_shift reference standard deviations away, outside a hold. A restart (shift
or, with bn_warmup_release, a hold's domain-shift release) rebuilds the reference from the next images. The
reference is kept in warm.slow / warm.slow_sq, its count on the state object (held-out runs only: no snapshots).
Runs a script's main (argv after the script name) with AdaptationEngine._warmup_on_shift and _restart_warmup
replaced."""
import os, runpy, sys
import torch
sys.path.insert(0, "scripts")
from mgg_core import engine as E
from mgg_core.guard import image_descriptor

REF = int(os.environ.get("FZ_REF", "32"))


def restart(self, state):
    state.tensors["norm.seen"] = torch.zeros_like(state.tensors["norm.seen"])
    state.__dict__["_fz_n"] = 0


def on_shift(self, job):
    state = job.state
    if self.warmup_shift is None or "warm.slow" not in state.tensors:
        return
    cnt = state.__dict__.get("_fz_n", 0)
    if cnt < REF:                                   # building the reference from the next images
        d = image_descriptor(job.x).double()[:REF - cnt]
        k = d.shape[0]
        if cnt == 0:
            ref, ref_sq = d.mean(0), d.pow(2).mean(0)
        else:
            ref = (cnt * state.tensors["warm.slow"] + d.sum(0)) / (cnt + k)
            ref_sq = (cnt * state.tensors["warm.slow_sq"] + d.pow(2).sum(0)) / (cnt + k)
        state.tensors["warm.slow"], state.tensors["warm.slow_sq"] = ref, ref_sq
        state.__dict__["_fz_n"] = cnt + k
        return
    ref, ref_sq = state.tensors["warm.slow"], state.tensors["warm.slow_sq"]
    var = (ref_sq - ref.pow(2)).clamp(min=0) + 1e-4
    fast = state.tensors["guard.shift_fast"].double()
    if float(state.tensors["guard.hold"]) <= 0 and float(((fast - ref).abs() / var.sqrt()).max()) > self.warmup_shift:
        restart(self, state)


E.AdaptationEngine._warmup_on_shift, E.AdaptationEngine._restart_warmup = on_shift, restart
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
