"""Diagnostic patch (session 7): a source whose predictions are about as diverse as the adapted model's is a usable
reference, however few classes it predicts (label shift), in ``guard.judge`` only (holds and their releases
unchanged). The engine's ``judge`` is replaced by one that, when the source's histogram diversity is below
``min_source_diversity`` but at least RD_FLOOR and at least RD_RATIO times the adapted model's on the same checked
images, judges with ``min_source_diversity`` = 0. No-op unless RD_RATIO is set. Then runs a script's main (argv after
the script name)."""
import dataclasses, os, runpy, sys
sys.path.insert(0, "scripts")
from mgg_core import engine as E
from mgg_core import guard as G

RATIO = os.environ.get("RD_RATIO")
FLOOR = float(os.environ.get("RD_FLOOR", "0.1"))
_judge = G.judge


def judge(cfg, g, images):
    if RATIO is not None and float(g["checked"]) >= cfg.warmup_checks:
        ds, da = G.source_diversity(g["source_hist"]), G.source_diversity(g["adapted_hist"])
        if cfg.min_source_diversity > ds >= max(FLOOR, float(RATIO) * da):
            return _judge(dataclasses.replace(cfg, min_source_diversity=0.0), g, images)
    return _judge(cfg, g, images)


E.judge = judge
script = sys.argv[1]; sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
