"""FastAPI dependencies shared by the routes: the service state, readiness, admin auth and stream-id checks.

The service state lives on ``app.state.svc`` (set by :func:`service.app.create_app`); dependencies read it from the
request, so routers hold no closures over one app.

Every dependency is ``async def``: none of them blocks, and FastAPI runs a plain ``def`` dependency in its thread
pool, one thread hop per dependency per request, each waiting for the GIL behind the busy step and decode threads.
``POST /predict`` uses none: it reads its two headers itself (``service.routes.predict``), because resolving five
dependencies cost about 15% of the event loop's time per request under many small requests.
"""
from __future__ import annotations

import hmac

from fastapi import Depends, Header, Request

from ..dataplane import DataPlane
from ..errors import ApiError
from ..runtime import Runtime, ServiceState
from ..store import StreamStore, valid_stream_id

DEFAULT_STREAM = "default"


async def get_service(request: Request) -> ServiceState:
    svc: ServiceState = request.app.state.svc
    return svc


async def get_dataplane(request: Request) -> DataPlane:
    plane: DataPlane = request.app.state.dataplane
    return plane


async def require_ready(svc: ServiceState = Depends(get_service)) -> tuple[Runtime, StreamStore]:
    """The runtime and the store, or 503 (loading, load failed, shutting down)."""
    return svc.require_ready()


def _token_matches(token: str, authorization: str) -> bool:
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def check_admin(token: str | None, authorization: str | None) -> None:
    """401 without, 403 with a wrong ``Authorization: Bearer`` token; open when ``token`` is None. Shared by the
    FastAPI dependency below and the Ray ingress."""
    if token is None:
        return
    if not authorization:
        raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <admin token>'",
                       {"WWW-Authenticate": "Bearer"})
    if not _token_matches(token, authorization):
        raise ApiError(403, "forbidden", "the admin token is wrong", {"WWW-Authenticate": "Bearer"})


async def require_admin(
    svc: ServiceState = Depends(get_service),
    authorization: str | None = Header(None, include_in_schema=False),
) -> None:
    """401 without, 403 with a wrong ``Authorization: Bearer`` token; open when no admin token is set."""
    check_admin(svc.admin_token, authorization)


async def is_admin(
    svc: ServiceState = Depends(get_service),
    authorization: str | None = Header(None, include_in_schema=False),
) -> bool:
    """Whether the request may see admin details (right token, or no admin token configured); never raises."""
    token = svc.admin_token
    return token is None or (authorization is not None and _token_matches(token, authorization))


def check_stream_id(stream_id: str) -> str:
    """``stream_id`` itself, or 400 ``invalid_stream_id`` naming the rule."""
    if not valid_stream_id(stream_id):
        shown = stream_id if len(stream_id) <= 40 else stream_id[:40] + "..."
        raise ApiError(
            400, "invalid_stream_id",
            f"stream id {shown!r} is invalid: use 1-128 characters of letters, digits, '.', '_', '-'",
        )
    return stream_id


async def path_stream_id(stream_id: str) -> str:
    """The ``{stream_id}`` path parameter, checked."""
    return check_stream_id(stream_id)


ADMIN = [Depends(require_admin)]

__all__ = [
    "ADMIN", "DEFAULT_STREAM", "check_admin", "check_stream_id", "get_dataplane", "get_service", "is_admin",
    "path_stream_id", "require_admin", "require_ready",
]
