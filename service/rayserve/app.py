"""Build and run the Ray Serve application: an HTTP ingress in front of N shard replicas of the engine + store.

* ``build_app(settings, ray_settings)``: the Serve application (``serve.run`` it, or deploy it from a config).
* ``app_builder(args)``: the same for ``serve run service.rayserve.app:app_builder key=value ...`` and for the
  ``import_path`` of a Serve config file / KubeRay RayService (``args`` are ServiceSettings and ``ray_*`` fields).
* ``serve_forever(settings, ray_settings)``: what ``mgg serve --backend ray`` runs (connect or start a cluster,
  start Serve's HTTP proxy on ``host:port``, deploy, block until interrupted).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ..settings import ServiceSettings
from .router import ROUTER_CLASS
from .settings import RaySettings

log = logging.getLogger("mgg.service.ray")


def build_app(settings: ServiceSettings, ray: RaySettings) -> Any:
    """The Serve application. Args: settings: the service's settings; ray: the backend's settings."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from .ingress import Ingress
    from .shard import Shard

    dumped = settings.model_dump()
    dumped["snapshot_dir"] = str(settings.snapshot_dir.resolve())
    autoscaling = ray.autoscaling_config()
    shard = serve.deployment(
        Shard,
        name=ray.shard_deployment,
        num_replicas=None if autoscaling else ray.replicas,
        autoscaling_config=autoscaling,
        max_ongoing_requests=ray.max_ongoing_requests,
        ray_actor_options={"num_cpus": ray.replica_num_cpus, "num_gpus": ray.replica_num_gpus},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS),
        health_check_period_s=2,
        graceful_shutdown_timeout_s=30,
    )
    ingress = serve.deployment(Ingress, name="TTAIngress", num_replicas=ray.ingress_replicas,
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(shard.bind(dumped, ray.lease_timeout_s), dumped, ray.shard_deployment,
                        ray.request_timeout_s, ray.retries)


def split_args(args: dict[str, Any]) -> tuple[ServiceSettings, RaySettings]:
    """``ray_<field>`` keys go to RaySettings, the rest to ServiceSettings (env vars fill what is not given).

    An unknown key raises ValueError (a typo in a Serve config must not be ignored).
    """
    unknown = sorted(k for k in args if (k[4:] not in RaySettings.model_fields if k.startswith("ray_")
                                         else k not in ServiceSettings.model_fields))
    if unknown:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    ray_kw = {k[4:]: v for k, v in args.items() if k.startswith("ray_")}
    svc_kw = {k: v for k, v in args.items() if not k.startswith("ray_")}
    from ..settings import load_settings

    return load_settings(None, **svc_kw), RaySettings(**ray_kw)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder (``serve run`` / ``serve deploy`` / KubeRay ``import_path``)."""
    settings, ray = split_args(dict(args or {}))
    return build_app(settings, ray)


def start(settings: ServiceSettings, ray_settings: RaySettings) -> Any:
    """Connect to (or start) the cluster, start Serve's HTTP proxy on settings.host:port and deploy the app."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}
        if ray_settings.address:
            kw["address"] = ray_settings.address
        else:
            kw["num_cpus"] = ray_settings.num_cpus
            kw["_node_ip_address"] = "127.0.0.1"
        ray.init(**kw)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = build_app(settings, ray_settings)
    return serve.run(app, name=ray_settings.app_name, route_prefix="/", blocking=False)


def serve_forever(settings: ServiceSettings, ray_settings: RaySettings) -> int:
    base = f"http://{settings.host}:{settings.port}"
    n = ray_settings.autoscaling_config() or ray_settings.replicas
    print(f"mgg serve --backend ray: {settings.model} / {settings.method}, replicas {n}, "
          f"snapshots in {settings.snapshot_dir} (shared by every replica)", flush=True)
    start(settings, ray_settings)
    print(f"mgg serve --backend ray: ready at {base} (X-Served-By names the replica)", flush=True)
    import signal

    from ray import serve

    def _stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)  # docker/kubernetes stop: the same clean way down as Ctrl-C
    try:
        while True:
            time.sleep(5)
    except KeyboardInterrupt:
        if ray_settings.address:  # a shared cluster: remove only our application
            serve.delete(ray_settings.app_name)
        else:  # the local cluster we started: replicas snapshot their streams on the way down
            serve.shutdown()
    return 0


__all__ = ["build_app", "app_builder", "split_args", "start", "serve_forever"]
