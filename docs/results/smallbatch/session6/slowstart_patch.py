"""Diagnostic only (session 6, idea 2): slower BatchNorm statistics until the guard has warmed up. While a stream
has seen fewer than SS_IMAGES images (the guard's warm-up, 64), every layer's per-image momentum is capped at
SS_CAP (e.g. 0.001: the deep layers' momentum; the first layer otherwise follows ~5 images at 0.2). Monkeypatches
AdaptationEngine.step (the sweep/continual/held-out scripts step one stream at a time), then runs a script's main
(argv after the script name)."""
import os, runpy, sys
sys.path.insert(0, "scripts")
from mgg_core import engine as E

CAP, IMAGES = float(os.environ.get("SS_CAP", "0.001")), int(os.environ.get("SS_IMAGES", "64"))
_step = E.AdaptationEngine.step


def step(self, state, x, *args, **kwargs):
    if not self.norm.per_stream or state.images >= IMAGES:
        return _step(self, state, x, *args, **kwargs)
    saved = self.norm.momenta
    self.norm.momenta = {k: min(m, CAP) for k, m in saved.items()}
    try:
        return _step(self, state, x, *args, **kwargs)
    finally:
        self.norm.momenta = saved


E.AdaptationEngine.step = step
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
