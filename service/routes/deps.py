"""FastAPI dependencies shared by the routes: the service state, readiness, admin auth and stream-id checks.

The service state lives on ``app.state.svc`` (set by :func:`service.app.create_app`); dependencies read it from the
request, so routers hold no closures over one app.

Every dependency is ``async def``: none of them blocks, and FastAPI runs a plain ``def`` dependency in its thread
pool, one thread hop per dependency per request (five for ``POST /predict``), each waiting for the GIL behind the
busy step and decode threads.
"""
from __future__ import annotations

import hmac

from fastapi import Depends, Header, Request

from ..dataplane import DataPlane
from ..errors import ApiError
from ..idempotency import IDEMPOTENCY_HEADER, check_key
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


async def header_stream_id(
    x_stream_id: str = Header(
        DEFAULT_STREAM, alias="X-Stream-Id",
        description="stream whose state is used and updated: 1-128 of letters, digits, '.', '_', '-'",
    ),
) -> str:
    """The request's stream from the ``X-Stream-Id`` header (default ``default``), checked."""
    return check_stream_id(x_stream_id)


async def header_idempotency_key(
    idempotency_key: str | None = Header(
        None, alias=IDEMPOTENCY_HEADER,
        description="optional, per stream: a retry with the same key and request is answered with the first "
        "answer (header Idempotent-Replayed: true) and does not step again; 1-255 printable ASCII, no spaces",
    ),
) -> str | None:
    """The request's ``Idempotency-Key`` header (None when absent), checked."""
    return check_key(idempotency_key)


async def path_stream_id(stream_id: str) -> str:
    """The ``{stream_id}`` path parameter, checked."""
    return check_stream_id(stream_id)


ADMIN = [Depends(require_admin)]

__all__ = [
    "ADMIN", "DEFAULT_STREAM", "check_admin", "check_stream_id", "get_dataplane", "get_service",
    "header_idempotency_key", "header_stream_id",
    "is_admin", "path_stream_id", "require_admin", "require_ready",
]
