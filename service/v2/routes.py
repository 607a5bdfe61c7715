"""The Open Inference Protocol (KServe V2 REST) beside ``/predict``, with Triton's sequence and binary tensor
data extensions: one more protocol over the same :class:`~service.dataplane.DataPlane` (engine, stream store,
per-stream ordering, backpressure and metrics as ``/predict``).

- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``; ``GET /v2/models/{name}[/versions/{v}]`` (metadata),
  ``.../ready``; ``POST /v2/models/{name}[/versions/{v}]/infer``; ``POST /v2/repository/index`` (the model list of
  Triton's repository extension, read-only).
- The stream is ``parameters.sequence_id`` (see :data:`service.v2.codec.REQUEST_PARAMETERS`); as on ``/predict``,
  the request takes its place in the stream's queue once its whole body has arrived (a slow upload holds no slot).
- Every error under ``/v2`` is ``{"error": "<message>"}`` (the protocol's shape, not the V1 ``{"error": {code,
  message}}``): :class:`V2Route` converts the service's errors, request validation errors and HTTP errors, and
  answers anything unexpected with an opaque 500.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..dataplane import DataPlane, StepOutcome, finite
from ..decode import DecodedBatch, DecodeError, decode_body
from ..errors import ApiError
from ..idempotency import IDEMPOTENCY_HEADER, REPLAY_HEADER, Answer, check_key
from ..routes.deps import get_dataplane, get_service
from ..runtime import Runtime, ServiceState
from ..store import StreamStore, UnknownStream
from .codec import (
    HEADER_LENGTH,
    INPUT,
    OUTPUTS,
    REQUEST_PARAMETERS,
    InferRequest,
    V2Error,
    encode_response,
    header_length,
    input_as_npy,
    parse_header,
    tensor_metadata,
)

log = logging.getLogger("mgg.service.v2")

NPY_MEDIA_TYPE = "application/x-npy"  # the V2 tensor is handed to decode_body as the npy body it is

SERVER_NAME = "mgg-tta"
MODEL_VERSION = "1"
PLATFORM = "pytorch"
EXTENSIONS = ["binary_tensor_data", "sequence", "sequence(string_id)"]


def v2_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class V2Route(APIRoute):
    """An ``APIRoute`` whose errors use the V2 body ``{"error": "<message>"}`` (dependencies' errors too)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def v2_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except V2Error as exc:
                return v2_error(exc.status, exc.message, exc.headers)
            except ApiError as exc:
                return v2_error(exc.status, exc.message, exc.headers)
            except RequestValidationError as exc:
                msgs = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()]
                return v2_error(422, "; ".join(msgs) or "invalid request")
            except StarletteHTTPException as exc:
                return v2_error(exc.status_code, str(exc.detail), dict(exc.headers or {}))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unhandled error in %s %s", request.method, request.url.path)
                return v2_error(500, "internal server error")

        return v2_handler


router = APIRouter(prefix="/v2", route_class=V2Route, tags=["Open Inference Protocol (V2)"])


def model_name_of(svc: ServiceState, rt: Runtime | None) -> str | None:
    """The V2 model name: the ``model_name`` setting, else the classifier card's name (known once loaded)."""
    if svc.settings.model_name:
        return svc.settings.model_name
    return str(rt.info["model"]) if rt is not None else None


def check_model(svc: ServiceState, name: str, version: str | None) -> Runtime:
    """The runtime when ``name``/``version`` is this server's model and it is ready; else 404 or 503."""
    known = model_name_of(svc, svc.runtime)
    if known is not None and name != known:
        raise V2Error(404, f"unknown model {name!r}; this server serves {known!r}")
    if version is not None and version != MODEL_VERSION:
        raise V2Error(404, f"unknown version {version!r} of model {name!r}; its only version is {MODEL_VERSION!r}")
    rt, _ = svc.require_ready()
    if known is None and name != model_name_of(svc, rt):
        raise V2Error(404, f"unknown model {name!r}; this server serves {model_name_of(svc, rt)!r}")
    return rt


# ------------------------------------------------------------------------------------------ server


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Server live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server ready (200) or not yet (503)")
async def ready(svc: ServiceState = Depends(get_service)) -> JSONResponse:
    try:
        svc.require_ready()
    except ApiError as exc:
        return JSONResponse({"ready": False, "error": exc.message}, status_code=503, headers=exc.headers)
    return JSONResponse({"ready": True})


@router.post("/repository/index", summary="The served model (Triton's repository index, read-only)")
async def repository_index(svc: ServiceState = Depends(get_service)) -> list[dict[str, str]]:
    rt, _ = svc.require_ready()
    return [{"name": str(model_name_of(svc, rt)), "version": MODEL_VERSION, "state": "READY"}]


# ------------------------------------------------------------------------------------------- model


def _metadata(svc: ServiceState, name: str, version: str | None) -> dict[str, Any]:
    rt = check_model(svc, name, version)
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [tensor_metadata(INPUT, rt.num_classes)],
        "outputs": [tensor_metadata(spec, rt.num_classes) for spec in OUTPUTS.values()],
    }


@router.get("/models/{model_name}", summary="Model metadata")
async def model_metadata(model_name: str, svc: ServiceState = Depends(get_service)) -> dict[str, Any]:
    return _metadata(svc, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}", summary="Model metadata (one version)")
async def model_version_metadata(
    model_name: str, model_version: str, svc: ServiceState = Depends(get_service),
) -> dict[str, Any]:
    return _metadata(svc, model_name, model_version)


def _model_ready(svc: ServiceState, name: str, version: str | None) -> JSONResponse:
    try:
        check_model(svc, name, version)
    except ApiError as exc:  # known model, not ready yet
        return JSONResponse({"name": name, "ready": False, "error": exc.message}, status_code=503,
                            headers=exc.headers)
    return JSONResponse({"name": name, "ready": True})


@router.get("/models/{model_name}/ready", summary="Model ready (200), not yet (503), unknown (404)")
async def model_ready(model_name: str, svc: ServiceState = Depends(get_service)) -> JSONResponse:
    return _model_ready(svc, model_name, None)


@router.get("/models/{model_name}/versions/{model_version}/ready", summary="Model version ready")
async def model_version_ready(
    model_name: str, model_version: str, svc: ServiceState = Depends(get_service),
) -> JSONResponse:
    return _model_ready(svc, model_name, model_version)


# ------------------------------------------------------------------------------------------- infer


class _Body:
    """The request body read in two parts under ``limit`` bytes: the JSON header first, then the rest."""

    def __init__(self, request: Request, limit: int) -> None:
        self._chunks: AsyncIterator[bytes] = request.stream().__aiter__()
        self.buf = bytearray()
        self.limit = limit
        self.done = False
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                raise V2Error(400, "Content-Length is not an integer") from None
            if n > limit:
                raise V2Error(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")

    async def read_until(self, size: int | None) -> None:
        """Read until ``size`` bytes are in (None: the whole body); 413 past the limit."""
        while not self.done and (size is None or len(self.buf) < size):
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self.done = True
                break
            self.buf += chunk
            if len(self.buf) > self.limit:
                raise V2Error(413, f"request body exceeds the limit of {self.limit} bytes")


async def _read_header(request: Request, body: _Body) -> tuple[InferRequest, int]:
    """Read and parse the JSON header; returns it and its length in bytes."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
    hlen = header_length(request.headers.get(HEADER_LENGTH))
    await body.read_until(hlen)
    if hlen is None:
        hlen = len(body.buf)
    elif hlen > len(body.buf):
        raise V2Error(400, f"{HEADER_LENGTH} {hlen} is longer than the {len(body.buf)}-byte body")
    # with binary data, the header is parsed before the data is read; _decode checks the data's size
    req = parse_header(bytes(body.buf[:hlen]), binary_size=len(body.buf) - hlen if body.done else None)
    return req, hlen


async def _decode(svc: ServiceState, req: InferRequest, body: _Body, hlen: int) -> DecodedBatch:
    """The input tensor as a decoded batch: the npy path of /predict (its checks, limits and pixel budget)."""
    tail = memoryview(body.buf)[hlen:]
    if req.binary_size is not None and req.binary_size != len(tail):
        raise V2Error(400, f"input {INPUT.name!r} declares binary_data_size {req.binary_size} but {len(tail)} bytes "
                           "follow the JSON header")
    if req.binary_size is None and len(tail):
        raise V2Error(400, f"{len(tail)} bytes follow the JSON header but no input declares binary_data_size")
    try:
        return await asyncio.to_thread(
            lambda: decode_body(input_as_npy(req, tail), NPY_MEDIA_TYPE, svc.limits, svc.pixels))
    except DecodeError as exc:
        raise V2Error(exc.status, exc.message, exc.headers) from None


def step_parameters(sequence_id: int | str, out: StepOutcome, unloaded: bool | None) -> dict[str, Any]:
    """The inference response's parameters for one step (shared with the Ray backend's shards)."""
    res = out.result
    params: dict[str, Any] = {
        "sequence_id": sequence_id, "step": out.step, "adapted": bool(res.adapted),
        "rolled_back": bool(res.rolled_back), "predictions_after_update": out.post_update,
    }
    optional = {  # reasons are StrEnums: sent as their plain strings
        "skipped_reason": None if res.adapted or res.skipped_reason is None else str(res.skipped_reason),
        "rollback_reason": str(res.rollback_reason) if res.rolled_back and res.rollback_reason else None,
        "reset_reason": str(res.reset_reason) if res.reset_reason else None,
        "hold_released": str(res.hold_released) if res.hold_released else None,
        "hold_images": res.hold_images,
        "batch_entropy": finite(res.batch_entropy),
        "loss": finite(res.loss),
        "unloaded": unloaded,
    }
    params.update({k: v for k, v in optional.items() if v is not None})  # V2 parameters have no null
    return params


def step_tensors(out: StepOutcome) -> dict[str, Any]:
    """The output tensors of one step as numpy arrays, keyed by :data:`OUTPUTS` name."""
    o = out.outputs
    labels = np.array([idx[0] for idx in o.top_i], dtype=np.int64)
    return {"probabilities": o.probs.numpy(), "labels": labels, "entropy": o.entropy.numpy()}


def _answer(name: str, req: InferRequest, out: StepOutcome, unloaded: bool | None) -> Answer:
    content, headers = encode_response(model_name=name, model_version=MODEL_VERSION, request_id=req.id,
                                       parameters=step_parameters(req.sequence_id, out, unloaded),
                                       tensors=step_tensors(out), outputs=req.outputs)
    return Answer(200, headers.pop("Content-Type"), content, headers)


def _response(name: str, req: InferRequest, out: StepOutcome, unloaded: bool | None) -> Response:
    answer = _answer(name, req, out, unloaded)
    return Response(content=answer.body, headers=answer.headers, media_type=answer.media_type)


def _idempotency_key(request: Request, svc: ServiceState, req: InferRequest) -> str | None:
    """The ``Idempotency-Key`` header, else the request's ``id`` when ``idempotency_v2_request_id`` is on."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None and svc.settings.idempotency_v2_request_id:
        key = req.id
    return check_key(key)


async def _infer(request: Request, name: str, version: str | None, svc: ServiceState, plane: DataPlane) -> Response:
    rt = check_model(svc, name, version)
    _, store = plane.ready()
    body = _Body(request, svc.settings.max_body_bytes)
    req, hlen = await _read_header(request, body)
    key = _idempotency_key(request, svc, req)
    # the whole body first, as /predict does (bounded in size here and in time by HttpGuard): a slow or silent
    # upload holds no queue slot; the order of adaptation is the order in which bodies completed
    await body.read_until(None)
    ticket = plane.reserve(store, req.stream_id)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        batch = await _decode(svc, req, body, hlen)
        timings["decode"] = time.perf_counter() - t0
        try:
            if key is None:
                out = await plane.step(rt, store, ticket, batch, timings, reset_first=req.sequence_start)
            else:  # the stored answer has no `unloaded` (it is rendered before sequence_end unloads the stream)
                params = {"route": "v2", "model": name, "version": version, "id": req.id, "outputs": req.outputs,
                          "start": req.sequence_start, "end": req.sequence_end}
                stepped, answer, replayed = await plane.step_idempotent(
                    rt, store, ticket, batch, timings, key, params, lambda o: _answer(name, req, o, None),
                    reset_first=req.sequence_start)
                if stepped is None:
                    return answer.response(key, replayed)
                out = stepped
        finally:
            batch.release()  # no-op once step has released it after preprocessing
    finally:
        ticket.abandon()  # no-op once the job owns the ticket
    unloaded = await _end_sequence(store, req.stream_id) if req.sequence_end else None
    response = _response(name, req, out, unloaded)
    if key is not None:
        response.headers.update({IDEMPOTENCY_HEADER: key, REPLAY_HEADER: "false"})
    return response


async def _end_sequence(store: StreamStore, stream_id: str) -> bool:
    """sequence_end: snapshot and unload the stream (shielded: a client hang-up does not stop it halfway); False
    when the snapshot failed (the stream stays in memory) or an admin deleted the stream meanwhile."""
    try:
        return await asyncio.shield(store.unload(stream_id, reason="sequence_end"))
    except UnknownStream:
        return False


INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "required": ["inputs", "parameters"], "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object", "description": "; ".join(
                        f"{k}: {v}" for k, v in REQUEST_PARAMETERS.items())},
                    "inputs": {"type": "array", "items": {"type": "object"},
                               "description": f"exactly one: {INPUT.name} ({INPUT.datatype}), {INPUT.doc}"},
                    "outputs": {"type": "array", "items": {"type": "object"}, "description": "; ".join(
                        f"{o.name} ({o.datatype}): {o.doc}" for o in OUTPUTS.values())},
                }},
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"binary tensor data extension: the JSON request ({HEADER_LENGTH} bytes), then the "
                               "input's raw bytes",
            },
        },
    }
}
_INFER_DOC: dict[str, Any] = {"openapi_extra": INFER_BODY, "response_class": Response}


@router.post("/models/{model_name}/infer", summary="Classify a batch, then adapt the sequence's stream on it",
             **_INFER_DOC)
async def infer(
    request: Request, model_name: str, svc: ServiceState = Depends(get_service),
    plane: DataPlane = Depends(get_dataplane),
) -> Response:
    return await _infer(request, model_name, None, svc, plane)


@router.post("/models/{model_name}/versions/{model_version}/infer", summary="Infer (one version)", **_INFER_DOC)
async def infer_version(
    request: Request, model_name: str, model_version: str, svc: ServiceState = Depends(get_service),
    plane: DataPlane = Depends(get_dataplane),
) -> Response:
    return await _infer(request, model_name, model_version, svc, plane)


__all__ = [
    "EXTENSIONS", "INFER_BODY", "MODEL_VERSION", "NPY_MEDIA_TYPE", "PLATFORM", "SERVER_NAME", "V2Route", "check_model",
    "model_name_of", "router", "step_parameters", "step_tensors", "v2_error",
]
