"""Session 10's held-out rule metrics (RULE.md) from the ho10_<tag>_*.json files: python summarize.py TAG:VARIANT ...

The same metrics as sessions 7 and 8 (``../session7/summarize.py``, run here over this folder's ``ho10_`` files); base
is round 1 of session 8: ``python ../session8/summarize.py r1:base``."""
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.argv = [sys.argv[0], "--dir", HERE, "--prefix", "ho10", *sys.argv[1:]]
runpy.run_path(os.path.join(HERE, "..", "session7", "summarize.py"), run_name="__main__")
