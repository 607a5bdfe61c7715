"""TTA methods: one small class per module behind one interface (``base.py``), found through a registry.

A method turns a test batch into a gradient for the adapted scalars (its loss, its sample filter, its extra
passes); the optimizer (``optim.py``) turns that gradient into an update. So TENT + MGG, FOA + MGG (= MGTTA) and
SAR + SGD are all the same engine with different parts.

Reference hyper-parameters are given for ImageNet (C = 1000) in the papers; class-count dependent ones are scaled
here by ln C / ln 1000 (entropy margins: 0.4 ln C for EATA/SAR, 0.5 ln C for DeYO; SAR's reset constant
0.2 nats -> 0.2 ln C / ln 1000) and by sqrt(1000 / C) for EATA's cosine redundancy margin (0.05 at C = 1000,
the cosine of a one-hot vector with the uniform one being 1/sqrt(C)).
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import (
    METHODS,
    GradOutput,
    Method,
    MethodState,
    Objectives,
    StepContext,
    Timer,
    build_method,
    loss_verdict,
    register,
)

__all__ = ["METHODS", "GradOutput", "Method", "MethodState", "Objectives", "StepContext", "Timer", "build_method",
           "loss_verdict", "register"]

# every module of this package registers its method on import: adding a method is adding a file
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_mod}")
METHODS.sort(key=lambda cls: cls.order)
