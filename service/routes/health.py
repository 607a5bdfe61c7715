"""Probes and introspection: /healthz (liveness), /readyz, /info, /metrics (Prometheus) and / (to /docs)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import RedirectResponse, Response

from .. import __version__
from ..runtime import ServiceState
from ..schemas import error_doc
from .deps import get_service, is_admin, require_ready

router = APIRouter()


@router.get("/healthz", summary="Liveness")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and warmed up", responses={503: error_doc("not ready")})
async def readyz(svc: ServiceState = Depends(get_service), _: Any = Depends(require_ready)) -> dict[str, Any]:
    return {"status": "ready", "warmup_seconds": svc.warmup_seconds}


def _limits(svc: ServiceState) -> dict[str, Any]:
    s = svc.settings
    return {
        "max_images": s.max_images,
        "max_body_bytes": s.max_body_bytes,
        "max_image_pixels": s.max_image_pixels,
        "max_concurrent_streams": s.max_concurrent_streams,
        "max_queue_per_stream": s.max_queue_per_stream,
        "max_queue_total": s.max_queue_total,
        "state_budget_bytes": s.state_budget_bytes,
        "idle_seconds": s.idle_seconds,
        "max_request_pixels": s.max_request_pixels,
        "max_pixels_in_flight": s.max_pixels_in_flight,
        "body_timeout_seconds": s.body_timeout_seconds,
        "body_idle_timeout_seconds": s.body_idle_timeout_seconds,
        "max_streams": s.max_streams,
        "max_snapshot_bytes": s.max_snapshot_bytes,
        "snapshot_retention_seconds": s.snapshot_retention_seconds,
        "max_page_size": s.max_page_size,
        "durability": s.durability,
        "snapshot_interval_steps": s.snapshot_interval_steps,
        "snapshot_interval_seconds": s.snapshot_interval_seconds,
        "limit_concurrency": s.limit_concurrency,
        "timeout_keep_alive_seconds": s.timeout_keep_alive_seconds,
        "header_timeout_seconds": s.header_timeout_seconds,
        "max_header_bytes": s.max_header_bytes,
        "max_headers": s.max_headers,
        "idempotency_keys": s.idempotency_keys,
        "idempotency_max_bytes": s.idempotency_max_bytes,
    }


PATH_FIELDS = ("checkpoint", "mgg_checkpoint", "source_stats")  # file names only, unless the caller is admin


def _model_info(info: dict[str, Any], admin: bool) -> dict[str, Any]:
    if admin:
        return info
    return {k: (Path(v).name if k in PATH_FIELDS and isinstance(v, str) and ("/" in v or "\\" in v) else v)
            for k, v in info.items()}


@router.get("/info", summary="Model, method and limits (checkpoint folders only with the admin token)")
async def info(svc: ServiceState = Depends(get_service), admin: bool = Depends(is_admin)) -> dict[str, Any]:
    rt = svc.runtime
    return {
        "version": __version__,
        "ready": svc.ready,
        "model": _model_info(rt.info, admin) if rt is not None else None,
        "return_post_update": svc.settings.return_post_update,
        "limits": _limits(svc),
        "admin_token_required": svc.admin_token is not None,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def prometheus(svc: ServiceState = Depends(get_service)) -> Response:
    if svc.store is not None:
        svc.store._update_gauges()
    body, ctype = svc.metrics.render()
    return Response(content=body, media_type=ctype)


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/docs")


__all__ = ["router"]
