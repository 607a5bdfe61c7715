"""Diagnostic only: the warm-up (bn_prior_images) restarts on a detected domain shift instead of at source restarts.
Per stream (Python attributes, not snapshot-safe): slow EMA (tau SLOW images) of the guard's pixel descriptor and of
its square; a shift = some feature of the guard's fast EMA more than THR slow std devs from the slow mean. On a shift
norm.seen := 0 (warm-up restarts) and the slow reference restarts at the fast value. After a fallback to source the
count is set past the warm-up (no warm-up at source restarts). Env: SW_THR (6), SW_SLOW (64)."""
import os, runpy, sys, torch
sys.path.insert(0, "scripts")
from mgg_core import engine as E
from mgg_core.guard import image_descriptor

import atexit
TRIG = [0]
atexit.register(lambda: print('shift triggers', TRIG[0]))
THR, SLOW = float(os.environ.get("SW_THR", 6)), float(os.environ.get("SW_SLOW", 64))
_to_source, _guard, _new = E.AdaptationEngine._to_source, E.AdaptationEngine._guard, E.AdaptationEngine.new_state

def done(st):
    if "norm.seen" in st.tensors:
        st.tensors["norm.seen"] = torch.full_like(st.tensors["norm.seen"], 1e9)

def to_source(self, st):
    _to_source(self, st); done(st)

def new_state(self, seed=0):
    st = _new(self, seed); done(st); return st

def guard(self, job):
    _guard(self, job)
    if "norm.seen" not in job.state.tensors:
        return
    st, d = job.state, image_descriptor(job.x).double()
    n, keep = d.shape[0], (1 - 1 / SLOW) ** d.shape[0]
    m, sq = d.mean(0), d.pow(2).mean(0)
    ref = st.__dict__.get("_sw")
    if ref is None:
        st.__dict__["_sw"] = [m, sq]; return
    fast = st.tensors["guard.shift_fast"].double()
    var = (ref[1] - ref[0].pow(2)).clamp(min=0) + 1e-4
    if float(((fast - ref[0]).abs() / var.sqrt()).max()) > THR and float(st.tensors["guard.hold"]) <= 0:
        st.tensors["norm.seen"] = torch.zeros_like(st.tensors["norm.seen"])
        st.__dict__["_sw"] = [fast.clone(), fast.pow(2) + var]; TRIG[0] += 1
        return
    ref[0], ref[1] = keep * ref[0] + (1 - keep) * m, keep * ref[1] + (1 - keep) * sq

E.AdaptationEngine._to_source, E.AdaptationEngine._guard, E.AdaptationEngine.new_state = to_source, guard, new_state
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
