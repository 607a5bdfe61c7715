"""Strict per-stream routing for the shard deployment: a Ray Serve request router keyed on the stream id.

Contract. The ingress calls the shard deployment with ``handle.options(session_id=<stream id>)``. This router
(Ray Serve's consistent-hash router with no fallback replicas) maps the stream id onto one replica of the
current replica set and waits for that replica when it is busy; it never spills a stream onto another replica
(Ray's model multiplexing does, see docs/deploy.md). When the replica set changes (scale up/down, a replica
dies and is replaced) a stream may map to another replica; the lease/fencing rule (``lease.py``) then makes
the new replica restore the stream from its snapshot before advancing it.

A routing key of the form ``@replica:<unique id>`` addresses one replica directly (used by the ingress to
collect ``/streams`` and ``/metrics`` from every replica). ``registry.replica_ids(deployment)`` lists the replica ids
the router in this process currently knows
(the ingress's view, kept in :mod:`.registry`).
"""
from __future__ import annotations

from typing import Any

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

TARGET_PREFIX = "@replica:"

def target_key(replica_id: str) -> str:
    return TARGET_PREFIX + replica_id


class StreamRouter(ConsistentHashRouter):
    """ConsistentHashRouter with strict affinity (``num_fallback_replicas=0``) and direct replica addressing."""

    def initialize_state(self, **kwargs: Any) -> None:
        kwargs.setdefault("num_fallback_replicas", 0)
        super().initialize_state(**kwargs)
        from service.rayserve.registry import ROUTERS  # imported at run time: this module is pickled by value

        ROUTERS[self._deployment_id.name] = self

    async def choose_replicas(self, candidate_replicas: list[Any], pending_request: Any = None) -> list[list[Any]]:
        key = getattr(getattr(pending_request, "metadata", None), "session_id", "") or ""
        if key.startswith(TARGET_PREFIX):
            wanted = key[len(TARGET_PREFIX):]
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True
            return [[r for rid, r in self._replicas.items() if rid.unique_id == wanted]]
        return await super().choose_replicas(candidate_replicas, pending_request)

    def current_replica_ids(self) -> list[str]:
        return sorted(r.unique_id for r in self._replica_id_set)


ROUTER_CLASS = f"{__name__}.StreamRouter"

__all__ = ["StreamRouter", "ROUTER_CLASS", "TARGET_PREFIX", "target_key"]
