"""Diagnostic only (session 6): print, per request, when the statistics warm-up restarts (norm.seen := 0), why
(domain-shift detector or hold release) and the guard's fallbacks/releases. Runs a script's main (argv after the
script name) with AdaptationEngine._restart_warmup and ._guard wrapped."""
import runpy, sys
sys.path.insert(0, "scripts")
from mgg_core import engine as E

_restart, _guard = E.AdaptationEngine._restart_warmup, E.AdaptationEngine._guard
_where = {"in": "shift"}


def restart(self, state):
    print(f"  restart warm-up at image {state.images} ({_where['in']})", flush=True)
    _restart(self, state)


def guard(self, job):
    _where["in"] = "release"
    try:
        _guard(self, job)
    finally:
        _where["in"] = "shift"
    r = job.result
    if r.rolled_back or r.hold_released is not None:
        print(f"  image {job.state.images}: fallback={r.rollback_reason} release={r.hold_released}", flush=True)


E.AdaptationEngine._restart_warmup, E.AdaptationEngine._guard = restart, guard
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
