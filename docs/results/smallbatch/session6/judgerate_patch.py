"""Diagnostic only (session 6, round 4): outside holds the guard judges only once at least JR_IMAGES images arrived
since its last judgement (the count on the state object: held-out runs only, no snapshots); holds and their
releases are handled on every request as before. Runs a script's main (argv after the script name) with
AdaptationEngine._guard wrapped."""
import os, runpy, sys
sys.path.insert(0, "scripts")
from mgg_core import engine as E

J = int(os.environ.get("JR_IMAGES", "16"))
_guard = E.AdaptationEngine._guard


def guard(self, job):
    st = job.state
    if float(st.tensors["guard.hold"]) > 0:
        return _guard(self, job)
    since = st.__dict__.get("_jr_since", 0) + job.x.shape[0]
    if since < J:
        st.__dict__["_jr_since"] = since
        return None
    st.__dict__["_jr_since"] = 0
    return _guard(self, job)


E.AdaptationEngine._guard = guard
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
