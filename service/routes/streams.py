"""Admin routes (Bearer token when ``admin_token`` is set): reset, list, inspect, snapshot and delete streams."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Response

from ..dataplane import persist_error
from ..errors import ApiError
from ..runtime import Runtime, ServiceState
from ..schemas import ResetRequest, ResetResponse, StreamInfo, StreamList, error_doc
from ..store import PersistError, StreamStore, UnknownStream
from .deps import ADMIN, check_stream_id, get_service, path_stream_id, require_ready

router = APIRouter(dependencies=ADMIN)

_UNKNOWN: dict[int | str, dict[str, Any]] = {404: error_doc("unknown stream")}


def _unknown(sid: str) -> ApiError:
    return ApiError(404, "unknown_stream", f"no stream {sid!r}")


@router.post(
    "/reset", response_model=ResetResponse, summary="Restore source state",
    responses={401: error_doc("missing token"), 403: error_doc("wrong token"), 404: error_doc("unknown stream"),
               422: error_doc("invalid body")},
)
async def reset(req: ResetRequest, svc: ServiceState = Depends(get_service)) -> ResetResponse:
    # Readiness is checked here, not as a dependency: dependencies run before body validation, and a bad body
    # must stay a 422 while the model loads (the order callers saw before the routes were split).
    _, store = svc.require_ready()
    if req.all:
        return ResetResponse(reset=await store.reset_all())
    sid = check_stream_id(req.stream_id or "")
    try:
        await store.reset(sid)
    except UnknownStream:
        raise _unknown(sid) from None
    return ResetResponse(reset=[sid])


@router.get("/streams", response_model=StreamList, summary="Known streams, one page at a time",
            responses={422: error_doc("limit over max_page_size")})
async def streams(
    ready: tuple[Runtime, StreamStore] = Depends(require_ready),
    svc: ServiceState = Depends(get_service),
    after: str | None = Query(None, description="list streams whose id sorts after this one (the previous "
                              "page's next_after)", max_length=128),
    limit: int | None = Query(None, ge=1, description="streams per page (default and maximum: max_page_size)"),
) -> StreamList:
    _, store = ready
    cap = svc.settings.max_page_size
    if limit is not None and limit > cap:
        raise ApiError(422, "invalid_request", f"limit: at most {cap} streams per page (max_page_size)")
    page, next_after = store.page(after=after, limit=limit or cap)
    return StreamList(streams=[StreamInfo(**i) for i in page], next_after=next_after, **store.stats())


@router.get("/streams/{stream_id}", response_model=StreamInfo, summary="One stream", responses=_UNKNOWN)
async def stream(
    ready: tuple[Runtime, StreamStore] = Depends(require_ready), sid: str = Depends(path_stream_id),
) -> StreamInfo:
    _, store = ready
    try:
        return StreamInfo(**store.info(sid))
    except UnknownStream:
        raise _unknown(sid) from None


@router.post(
    "/streams/{stream_id}/snapshot", response_model=StreamInfo, summary="Write the stream's snapshot now",
    responses={**_UNKNOWN, 507: error_doc("the snapshot could not be written")},
)
async def snapshot(
    ready: tuple[Runtime, StreamStore] = Depends(require_ready), sid: str = Depends(path_stream_id),
) -> StreamInfo:
    _, store = ready
    try:
        return StreamInfo(**(await store.snapshot(sid)))
    except UnknownStream:
        raise _unknown(sid) from None
    except PersistError as exc:  # never 200 for a snapshot that is not on disk
        raise persist_error(exc) from None


@router.delete(
    "/streams/{stream_id}", status_code=204, summary="Forget a stream and delete its snapshot", responses=_UNKNOWN,
)
async def delete_stream(
    ready: tuple[Runtime, StreamStore] = Depends(require_ready), sid: str = Depends(path_stream_id),
) -> Response:
    _, store = ready
    try:
        await store.delete(sid)
    except UnknownStream:
        raise _unknown(sid) from None
    return Response(status_code=204)


__all__ = ["router"]
