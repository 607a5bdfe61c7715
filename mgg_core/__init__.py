"""mgg_core: online test-time adaptation with MGG and the classic methods (no HTTP in here).

This project never downloads weights or data at run time: the Hugging Face hub is switched off unless the
environment says otherwise (timm loads every checkpoint from a local file through its pretrained path).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
