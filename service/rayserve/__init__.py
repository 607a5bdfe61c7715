"""Ray Serve backend of the service (``mgg serve --backend ray``; optional extra ``pip install .[ray]``).

Layout: an HTTP ingress (:mod:`.ingress`) keeps each stream's arrival order and sends its calls, keyed by the
stream id, to one replica of the shard deployment (:mod:`.shard`: engine + stream store per replica) through a
strict consistent-hash request router (:mod:`.router`). Stream state lives in a snapshot folder every replica
reaches; leases with fencing (:mod:`.lease`) make sure two replicas never both advance a stream, and a stream
whose replica died or was scaled away is restored by the next one from its last acknowledged step.
Build/run: :mod:`.app`; settings (``MGG_RAY_*``): :mod:`.settings`.
"""
from __future__ import annotations

__all__: list[str] = []
