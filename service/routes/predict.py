"""``POST /predict``: multipart images or an ``.npy`` array in, predictions out, then one adaptation step.

This module owns only the protocol: reading the body under its byte limit (and, through
:class:`service.http_guard.HttpGuard`, its time limits) before taking a queue slot, and decoding it within the
pixel limits; the rest is
:class:`service.dataplane.DataPlane`, which a V2 (Open Inference Protocol) router can call the same way.

Per-request cost. The route takes no FastAPI dependencies: it reads the service from the app, checks readiness (503)
and then its two headers (``X-Stream-Id``, ``Idempotency-Key``: 400s) itself, in that order, and documents the
headers in the OpenAPI operation (``PREDICT_BODY["parameters"]``). Under 16 closed-loop streams of 4-image requests
the five dependencies it had took about 15% of the event loop's time (py-spy, session 8).
"""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..dataplane import DataPlane
from ..decode import IMAGE_FIELD
from ..errors import ApiError
from ..idempotency import IDEMPOTENCY_HEADER, check_key
from ..runtime import ServiceState
from ..schemas import PredictResponse, error_doc
from .deps import DEFAULT_STREAM, check_stream_id

router = APIRouter()
STREAM_ID_DESCRIPTION = "stream whose state is used and updated: 1-128 of letters, digits, '.', '_', '-'"
IDEMPOTENCY_DESCRIPTION = (
    "optional, per stream: a retry with the same key and request is answered with the first answer (header "
    "Idempotent-Replayed: true) and does not step again; 1-255 printable ASCII, no spaces")

PREDICT_BODY: dict[str, Any] = {
    # the two headers, documented here: the route reads them itself (module docstring, "Per-request cost")
    "parameters": [
        {"name": "X-Stream-Id", "in": "header", "required": False, "description": STREAM_ID_DESCRIPTION,
         "schema": {"type": "string", "default": DEFAULT_STREAM, "title": "X-Stream-Id"}},
        {"name": IDEMPOTENCY_HEADER, "in": "header", "required": False, "description": IDEMPOTENCY_DESCRIPTION,
         "schema": {"type": "string", "title": IDEMPOTENCY_HEADER}},
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [IMAGE_FIELD],
                    "properties": {
                        IMAGE_FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more image files (PNG, JPEG, ... any format PIL reads)",
                        }
                    },
                }
            },
            "application/x-npy": {
                "schema": {"type": "string", "format": "binary"},
                "description": ".npy array, dtype uint8, shape N x H x W x C (C = 1, 3 or 4) or N x H x W",
            },
        },
    }
}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as the declared or streamed size passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_request", "Content-Length is not an integer") from None
        if n > limit:
            raise ApiError(413, "body_too_large", f"request body of {n} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/predict",
    response_model=PredictResponse,
    openapi_extra=PREDICT_BODY,
    summary="Classify a batch, then adapt the stream on it",
    responses={
        400: error_doc("invalid image, npy array, multipart body or stream id"),
        408: error_doc("the body did not arrive in time (body_timeout_seconds, body_idle_timeout_seconds)"),
        413: error_doc("body, image, pixels or batch over a limit"),
        409: error_doc("the Idempotency-Key's request was applied but its answer was too large to keep"),
        415: error_doc("unsupported Content-Type"),
        422: error_doc("the Idempotency-Key was used for a different request on this stream"),
        429: error_doc("the stream's queue or the global queue is full (see Retry-After)"),
        503: error_doc("not ready, shutting down, or too many pixels in flight (see Retry-After)"),
        507: error_doc("stream or snapshot-disk limit reached, or the durable write failed"),
    },
)
async def predict(request: Request) -> PredictResponse | Response:
    """With an ``Idempotency-Key`` header (:mod:`service.idempotency`) a retry is answered from the stored answer
    (header ``Idempotent-Replayed: true``) instead of stepping the stream again."""
    svc: ServiceState = request.app.state.svc
    rt, store = svc.require_ready()  # 503 first, then the headers' 400s, as the dependencies they replace did
    sid = check_stream_id(request.headers.get("x-stream-id", DEFAULT_STREAM))
    key = check_key(request.headers.get(IDEMPOTENCY_HEADER))
    plane: DataPlane = request.app.state.dataplane
    # the body first (bounded in size and time by read_body and HttpGuard): a slow or silent upload holds no slot
    body = await read_body(request, svc.settings.max_body_bytes)
    ticket = plane.reserve(store, sid)  # the order of adaptation is the order in which bodies completed
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        # sizes are checked from the image headers and reserved from the in-flight budget before decoding
        batch = await plane.decode(body, request.headers.get("content-type"))
        del body
        timings["decode"] = time.perf_counter() - t0
        try:
            if key is not None:
                return await plane.infer_idempotent(rt, store, ticket, sid, batch, timings, key)
            return await plane.infer(rt, store, ticket, sid, batch, timings)
        finally:
            batch.release()  # no-op once infer has released it after preprocessing
    finally:
        ticket.abandon()  # no-op once the job owns the ticket


__all__ = ["PREDICT_BODY", "read_body", "router"]
