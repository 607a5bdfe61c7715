"""One Prometheus exposition for every replica: each shard's ``tta_*`` families with a ``replica`` label.

Contract: ``merge_replica_metrics({replica_id: exposition_text}, skip=prefixes)`` returns a collector whose
families hold every sample of every replica (label ``replica="<id>"`` added), each family once, so one scrape
of the ingress's ``/metrics`` shows all replicas (Prometheus sums or splits by ``replica``). Families whose name
starts with one of ``skip`` are dropped (the ingress exports its own HTTP metrics).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

REPLICA_LABEL = "replica"


class MergedReplicaMetrics:
    """A prometheus_client collector over already parsed families (register it in a registry, or call collect)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def merge_replica_metrics(texts: dict[str, str], skip: Iterable[str] = ()) -> MergedReplicaMetrics:
    skip = tuple(skip)
    merged: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text):
            if skip and fam.name.startswith(skip):
                continue
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                labels: dict[str, Any] = {**s.labels, REPLICA_LABEL: replica}
                out.samples.append(Sample(s.name, labels, s.value, s.timestamp, s.exemplar))
    return MergedReplicaMetrics(list(merged.values()))


__all__ = ["MergedReplicaMetrics", "merge_replica_metrics", "REPLICA_LABEL"]
