"""Routers of this process by deployment name (the ingress reads its router's replica set from here).

Separate from :mod:`.router` because Ray Serve pickles the router's module by value: state kept there would be
a copy, not this process's module.
"""
from __future__ import annotations

import weakref
from typing import Any

ROUTERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def replica_ids(deployment: str) -> list[str]:
    """Replica ids known to this process's router for ``deployment`` (empty before its first request)."""
    router = ROUTERS.get(deployment)
    return router.current_replica_ids() if router is not None else []


__all__ = ["ROUTERS", "replica_ids"]
