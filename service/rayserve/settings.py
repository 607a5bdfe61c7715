"""Settings of the Ray Serve backend (``mgg serve --backend ray``): env prefix ``MGG_RAY_``.

The service settings (model, method, limits, ``snapshot_dir``) stay in :class:`service.settings.ServiceSettings`;
these add the cluster, the replica count or autoscaling range, and per-replica resources.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MGG_RAY_", extra="ignore")

    address: str | None = Field(None, description="Ray cluster to join ('auto', 'ray://host:10001', host:6379); "
                                "None = start a local one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local cluster (None = all); ignored with address")
    replicas: int = Field(2, ge=1, description="shard replicas (fixed count; see min/max_replicas to autoscale)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling lower bound (with max_replicas)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling upper bound; set to enable autoscaling")
    target_ongoing_requests: float = Field(2.0, gt=0, description="autoscaling target per replica")
    replica_num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per shard replica")
    replica_num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per shard replica (set device=cuda)")
    max_ongoing_requests: int = Field(8, ge=1, description="concurrent calls one shard replica accepts")
    ingress_replicas: int = Field(1, ge=1, description="ingress replicas (arrival order is kept per ingress)")
    request_timeout_s: float = Field(120.0, gt=0, description="limit on one call from the ingress to a replica")
    lease_timeout_s: float = Field(30.0, gt=0, description="how long a replica waits for another's stream lease")
    retries: int = Field(3, ge=0, description="retries of a call whose replica died")
    app_name: str = "mgg"
    shard_deployment: str = "TTAShard"

    @model_validator(mode="after")
    def _range(self) -> RaySettings:
        if self.max_replicas is not None and (self.min_replicas or 0) > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def autoscaling_config(self) -> dict[str, Any] | None:
        """Ray Serve's autoscaling_config, or None for a fixed replica count."""
        if self.max_replicas is None:
            return None
        return {"min_replicas": self.min_replicas if self.min_replicas is not None else 1,
                "initial_replicas": min(max(self.replicas, self.min_replicas or 1), self.max_replicas),
                "max_replicas": self.max_replicas, "target_ongoing_requests": self.target_ongoing_requests}


__all__ = ["RaySettings"]
