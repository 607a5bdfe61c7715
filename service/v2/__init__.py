"""The Open Inference Protocol (KServe V2 REST) with Triton's sequence and binary tensor data extensions.

:mod:`.codec` parses and writes V2 bodies (pure functions); :mod:`.routes` is the ``/v2`` router over the shared
:class:`~service.dataplane.DataPlane`. ``create_app`` mounts :data:`router`.
"""
from __future__ import annotations

from .codec import INPUT, OUTPUTS, REQUEST_PARAMETERS, V2Error
from .routes import EXTENSIONS, MODEL_VERSION, router

__all__ = ["EXTENSIONS", "INPUT", "MODEL_VERSION", "OUTPUTS", "REQUEST_PARAMETERS", "V2Error", "router"]
