"""Session 8's held-out rule metrics (RULE.md) from the ho8_<tag>_*.json files: python summarize.py TAG:VARIANT ...

The same metrics as session 7's (``../session7/summarize.py``, run here over this folder's ``ho8_`` files)."""
import os, runpy, sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.argv = [sys.argv[0], "--dir", HERE, "--prefix", "ho8", *sys.argv[1:]]
runpy.run_path(os.path.join(HERE, "..", "session7", "summarize.py"), run_name="__main__")
