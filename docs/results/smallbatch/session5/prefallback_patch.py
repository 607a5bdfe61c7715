"""Diagnostic only: a hold release restores the statistics the stream had when it fell back (theta/optimizer stay
at source). Monkeypatches the engine, then runs a script's main (argv after the script name)."""
import runpy, sys, torch
sys.path.insert(0, "scripts")
from mgg_core import engine as E
from mgg_core.guard import HOLD_REASONS

_fb, _guard = E.AdaptationEngine._fall_back, E.AdaptationEngine._guard

def fall_back(self, state, reason, result, statistics=True):
    held = float(state.tensors["guard.hold"]) > 0
    saved = state.group("norm") if (reason in HOLD_REASONS or held) else None
    _fb(self, state, reason, result, statistics)
    if saved is not None and float(state.tensors["guard.hold"]) > 0:
        state.__dict__["_pre_norm"] = {k: v.clone() for k, v in saved.items()}

def guard(self, job):
    _guard(self, job)
    st = job.state
    if job.result.hold_released is not None and "_pre_norm" in st.__dict__:
        st.set_group("norm", st.__dict__.pop("_pre_norm"))

E.AdaptationEngine._fall_back, E.AdaptationEngine._guard = fall_back, guard
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
