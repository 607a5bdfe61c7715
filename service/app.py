"""FastAPI app: online test-time adaptation over HTTP with per-stream state.

``create_app(settings)`` returns an app whose lifespan loads the classifier and builds the engine in a
background task (so /healthz answers at once and /readyz turns true after a warm-up step), opens the
:class:`~service.store.StreamStore` and, on graceful shutdown, snapshots every stream to disk.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .decode import IMAGE_FIELD, DecodeError, DecodeLimits, decode_body
from .metrics import ServiceMetrics
from .settings import ServiceSettings
from .store import (
    SnapshotRestoreError,
    StoreBusy,
    StoreClosed,
    StreamStore,
    UnknownStream,
    valid_stream_id,
)

log = logging.getLogger("mgg.service")

DEFAULT_STREAM = "default"


# ------------------------------------------------------------------------------------------- errors


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ErrorDetail(BaseModel):
    code: str = Field(..., examples=["invalid_image"])
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def _err(description: str) -> dict[str, Any]:
    return {"model": ErrorBody, "description": description}


# ------------------------------------------------------------------------------------------ schemas


class TopK(BaseModel):
    label: int
    class_name: str
    score: float


class Prediction(BaseModel):
    label: int = Field(..., description="argmax class index")
    class_name: str
    score: float = Field(..., description="softmax probability of `label`")
    entropy: float = Field(..., description="prediction entropy in nats")
    topk: list[TopK]


class PredictResponse(BaseModel):
    stream_id: str
    step: int = Field(..., description="updates this stream has taken (after this request)")
    adapted: bool = Field(..., description="whether this batch updated the stream's state")
    skipped_reason: str | None = Field(None, description="why no update was applied, or null")
    rolled_back: bool = Field(False, description="the collapse guard restored the last good state")
    rollback_reason: str | None = None
    reset_reason: str | None = Field(None, description="the method reset the stream to source after this batch")
    batch_entropy: float | None = Field(None, description="mean prediction entropy / ln(num_classes), 0..1")
    loss: float | None = None
    predictions_after_update: bool = Field(
        False, description="false: predictions were made before this batch's update (the paper's protocol)"
    )
    predictions: list[Prediction]
    timings: dict[str, float] = Field(default_factory=dict, description="seconds per phase")


class ResetRequest(BaseModel):
    stream_id: str | None = Field(None, description="stream to reset")
    all: bool = Field(False, description="reset every known stream")

    @model_validator(mode="after")
    def _one_of(self) -> ResetRequest:
        if bool(self.stream_id) == bool(self.all):
            raise ValueError('give either "stream_id" or "all": true')
        return self


class ResetResponse(BaseModel):
    reset: list[str]


class StreamInfo(BaseModel):
    stream_id: str
    step: int | None
    bytes: int = Field(..., description="size of the stream's state (in memory when resident)")
    resident: bool
    snapshot: bool = Field(..., description="a snapshot of the stream is on disk")
    last_seen: str | None
    entropy_ema: float | None
    pending: int
    requests: int
    rollbacks: int


class StreamList(BaseModel):
    streams: list[StreamInfo]
    streams_known: int
    streams_resident: int
    state_bytes: int
    state_budget_bytes: int
    queue_depth: int


# ----------------------------------------------------------------------------------------- runtime


@dataclass
class Runtime:
    """The loaded model and engine, shared by all streams."""

    classifier: Any
    engine: Any
    preprocessor: Any
    class_names: list[str]
    device: str
    input_size: tuple[int, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def resolve_checkpoint(model: str) -> Any:
    from pathlib import Path

    from mgg_core.classifier import DEFAULT_CHECKPOINTS, default_checkpoint

    return default_checkpoint(model) if model in DEFAULT_CHECKPOINTS else Path(model)


def load_runtime(settings: ServiceSettings) -> Runtime:
    """Load the classifier and build the engine (blocking; run it in a thread).

    Bundled companions are found the way the rest of the project finds them (``mgg_core.pretrain``): the MGG
    checkpoint pretrained for this classifier (matched by the weights' sha256, else the bundled one of the same
    default), and FOA's clean source statistics (the file beside the checkpoint, else computed from the card's
    clean training data).
    """
    from pathlib import Path

    import torch

    from mgg_core.classifier import load_classifier
    from mgg_core.engine import AdaptationEngine, EngineConfig, GuardConfig
    from mgg_core.methods import build_method

    device = settings.resolved_device()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    checkpoint = resolve_checkpoint(settings.model)
    clf = load_classifier(checkpoint, device=device)
    method = build_method(settings.method, clf.num_classes)
    optimizer = None
    if method.needs_grad:
        optimizer = (settings.optimizer or method.default_optimizer or "sgd").lower()

    mgg_checkpoint = settings.mgg_checkpoint
    if optimizer == "mgg" and mgg_checkpoint is None:
        from mgg_core.assets import DEFAULT_MGG_CHECKPOINTS, mgg_checkpoint_for

        found = mgg_checkpoint_for(clf) or DEFAULT_MGG_CHECKPOINTS.get(settings.model)
        if found is None or not Path(found).is_file():
            raise FileNotFoundError(
                f"no MGG checkpoint for classifier {checkpoint}: set mgg_checkpoint (train one with `mgg pretrain`)"
            )
        mgg_checkpoint = str(found)

    stats, stats_from = None, None
    if method.needs_features:
        if settings.source_stats:
            from mgg_core.features import load_stats

            stats, stats_from = load_stats(settings.source_stats), str(settings.source_stats)
        else:
            from mgg_core.assets import source_stats_for, stats_path_for

            stats = source_stats_for(clf, data=settings.source_data, device=device)
            beside = stats_path_for(checkpoint)
            stats_from = str(beside) if beside.is_file() else f"computed from clean {settings.source_data or 'mnist5k'} train"

    config = EngineConfig(
        method=settings.method,
        optimizer=optimizer,
        lr=settings.lr,
        mgg_checkpoint=mgg_checkpoint,
        guard=GuardConfig(enabled=settings.collapse_guard),
        device=device,
    )
    engine = AdaptationEngine(clf, config, source_stats=stats)
    class_names = list(clf.class_names)
    input_size = tuple(int(v) for v in clf.data_config["input_size"])
    info = {
        "model": clf.card.model_name,
        "checkpoint": str(checkpoint),
        "num_classes": len(class_names),
        "input_size": list(input_size),
        "method": settings.method,
        "optimizer": optimizer,
        "lr": settings.lr,
        "mgg_checkpoint": mgg_checkpoint,
        "source_stats": stats_from,
        "collapse_guard": settings.collapse_guard,
        "device": device,
        "torch": torch.__version__,
    }
    describe = getattr(engine, "describe", None)
    if callable(describe):
        info["engine"] = describe()
    return Runtime(clf, engine, clf.preprocessor, class_names, device, input_size, info)


def warm_up(rt: Runtime) -> float:
    """One adaptation step and one prediction on a throwaway state: compiles/allocates everything once."""
    import torch

    t0 = time.perf_counter()
    x = torch.zeros((2, *rt.input_size), dtype=torch.float32, device=rt.device)
    state = rt.engine.new_state()
    rt.engine.step(state, x)
    rt.engine.predict(state, x)
    return time.perf_counter() - t0


def make_predictions(logits: Any, class_names: list[str], topk: int) -> list[dict[str, Any]]:
    import torch

    logits = logits.detach().float().cpu()
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    ent = -(p * logp).nan_to_num(0.0).sum(dim=1)
    k = min(topk, p.shape[1])
    top_p, top_i = p.topk(k, dim=1)
    out = []
    for row in range(p.shape[0]):
        idx = top_i[row].tolist()
        sc = top_p[row].tolist()
        out.append(
            {
                "label": idx[0],
                "class_name": class_names[idx[0]],
                "score": sc[0],
                "entropy": float(ent[row]),
                "topk": [{"label": i, "class_name": class_names[i], "score": s} for i, s in zip(idx, sc)],
            }
        )
    return out


def _finite(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------------- app state


class ServiceState:
    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.runtime: Runtime | None = None
        self.store: StreamStore | None = None
        self.ready = False
        self.load_error: str | None = None
        self.warmup_seconds: float | None = None
        self.limits = DecodeLimits(max_images=settings.max_images, max_image_pixels=settings.max_image_pixels)
        admin = settings.admin_token
        self.admin_token: str | None = admin.get_secret_value() if admin is not None else None

    async def startup(self) -> None:
        s = self.settings
        try:
            rt = await asyncio.to_thread(load_runtime, s)
            self.warmup_seconds = await asyncio.to_thread(warm_up, rt)
            store = StreamStore(
                rt.engine,
                s.snapshot_dir,
                metrics=self.metrics,
                budget_bytes=s.state_budget_bytes,
                max_concurrent=s.max_concurrent_streams,
                max_queue_per_stream=s.max_queue_per_stream,
                max_queue_total=s.max_queue_total,
                idle_seconds=s.idle_seconds,
                idle_check_seconds=s.idle_check_seconds,
            )
            await store.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("model loading failed")
            return
        self.runtime, self.store = rt, store
        self.metrics.set_build_info(
            version=__version__, model=rt.info["model"], method=s.method, optimizer=rt.info["optimizer"] or "none",
            device=rt.device,
            torch=rt.info["torch"],
        )
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: %s on %s (warm-up %.2fs)", rt.info["model"], rt.device, self.warmup_seconds)

    def require_ready(self) -> tuple[Runtime, StreamStore]:
        if self.store is not None and self.store.closed:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
        if not self.ready or self.runtime is None or self.store is None:
            if self.load_error:
                raise ApiError(503, "model_load_failed", f"the model could not be loaded: {self.load_error}")
            raise ApiError(
                503, "not_ready", "the model is still loading; retry shortly",
                {"Retry-After": str(self.settings.retry_after_seconds)},
            )
        return self.runtime, self.store


# ----------------------------------------------------------------------------------------- factory


async def read_body(request: Request, limit: int) -> bytes:
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


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    metrics = ServiceMetrics()
    svc = ServiceState(settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.create_task(svc.startup(), name="mgg-model-loader")
        try:
            yield
        finally:
            if not loader.done():
                loader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await loader
            svc.ready = False
            metrics.ready.set(0)
            if svc.store is not None:
                await svc.store.close()
                log.info("all streams snapshotted to %s", settings.snapshot_dir)

    app = FastAPI(
        title="MGG test-time adaptation service",
        version=__version__,
        description=(
            "Online test-time adaptation of an image classifier, one adapting state per stream "
            "(header `X-Stream-Id`). Each POST /predict classifies a batch and then takes one adaptation "
            "step on it; states are kept in memory under a byte budget and snapshotted to disk. "
            "Errors always have the body `{\"error\": {\"code\": ..., \"message\": ...}}`."
        ),
        lifespan=lifespan,
    )
    app.state.svc = svc
    app.add_middleware(_HttpMetricsMiddleware, metrics=metrics)

    # ---- error handlers: one body shape for everything
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
        code = codes.get(exc.status_code, f"http_{exc.status_code}")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    # ---- auth
    def require_admin(authorization: str | None = Header(None, include_in_schema=False)) -> None:
        token = svc.admin_token
        if token is None:
            return
        if not authorization:
            raise ApiError(401, "unauthorized", "this endpoint needs 'Authorization: Bearer <admin token>'",
                           {"WWW-Authenticate": "Bearer"})
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(403, "forbidden", "the admin token is wrong", {"WWW-Authenticate": "Bearer"})

    admin = [Depends(require_admin)]

    def check_stream_id(stream_id: str) -> str:
        if not valid_stream_id(stream_id):
            shown = stream_id if len(stream_id) <= 40 else stream_id[:40] + "..."
            raise ApiError(
                400, "invalid_stream_id",
                f"stream id {shown!r} is invalid: use 1-128 characters of letters, digits, '.', '_', '-'",
            )
        return stream_id

    # ---- endpoints
    predict_body = {
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

    @app.post(
        "/predict",
        response_model=PredictResponse,
        openapi_extra=predict_body,
        summary="Classify a batch, then adapt the stream on it",
        responses={
            400: _err("invalid image, npy array, multipart body or stream id"),
            413: _err("body, image or batch over a limit"),
            415: _err("unsupported Content-Type"),
            429: _err("the stream's queue or the global queue is full (see Retry-After)"),
            503: _err("not ready or shutting down"),
        },
    )
    async def predict(
        request: Request,
        x_stream_id: str = Header(
            DEFAULT_STREAM, alias="X-Stream-Id",
            description="stream whose state is used and updated: 1-128 of letters, digits, '.', '_', '-'",
        ),
    ) -> PredictResponse:
        rt, store = svc.require_ready()
        sid = check_stream_id(x_stream_id)
        try:
            ticket = store.reserve(sid)  # arrival order is fixed here, before the body is read
        except StoreBusy as exc:
            code = "stream_queue_full" if exc.queue == "stream" else "queue_full"
            raise ApiError(429, code, exc.message, {"Retry-After": str(settings.retry_after_seconds)}) from None
        except StoreClosed as exc:
            raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None
        timings: dict[str, float] = {}
        try:
            body = await read_body(request, settings.max_body_bytes)
            t0 = time.perf_counter()
            try:
                batch = await asyncio.to_thread(decode_body, body, request.headers.get("content-type"), svc.limits)
            except DecodeError as exc:
                raise ApiError(exc.status, exc.code, exc.message) from None
            del body
            timings["decode"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                x = await asyncio.to_thread(rt.preprocessor, batch.payload)
            except (ValueError, TypeError, OSError) as exc:
                raise ApiError(400, "invalid_image", f"cannot preprocess the images: {exc}") from None
            timings["preprocess"] = time.perf_counter() - t0
            post = settings.return_post_update
            engine = rt.engine

            def adapt(state: Any) -> tuple[Any, list[dict[str, Any]], int]:
                xd = x.to(rt.device, non_blocking=True)
                res = engine.step(state, xd)
                logits = engine.predict(state, xd) if post else res.logits
                return res, make_predictions(logits, rt.class_names, settings.topk), int(state.step)

            try:
                res, preds, step = await store.run(ticket, adapt)
            except SnapshotRestoreError as exc:
                raise ApiError(500, "snapshot_restore_failed", f"{exc}; POST /reset this stream to start over") from None
        finally:
            ticket.abandon()  # no-op once the job owns the ticket

        n = len(preds)
        metrics.images.inc(n)
        for phase, sec in timings.items():
            metrics.observe_phase(phase, sec)
        for phase, sec in (getattr(res, "timings", None) or {}).items():
            timings[phase] = float(sec)
            metrics.observe_phase(phase, sec)
        if res.adapted:
            metrics.steps.inc()
        else:  # methods without gradient steps (noadapt, bn) report no reason
            metrics.skipped.labels(reason=str(res.skipped_reason or "method_takes_no_step")).inc()
        reset_reason = getattr(res, "reset_reason", None)
        if reset_reason:
            metrics.resets.labels(reason=str(reset_reason)).inc()
        be = _finite(getattr(res, "batch_entropy", None))
        if be is not None:
            metrics.batch_entropy.observe(be)
        rolled_back = bool(getattr(res, "rolled_back", False))
        if rolled_back:
            reason = str(getattr(res, "rollback_reason", None) or "unknown")
            metrics.rollbacks.labels(reason=reason).inc()
        return PredictResponse(
            stream_id=sid,
            step=step,
            adapted=bool(res.adapted),
            skipped_reason=None if res.adapted else res.skipped_reason,
            rolled_back=rolled_back,
            rollback_reason=getattr(res, "rollback_reason", None) if rolled_back else None,
            reset_reason=reset_reason,
            batch_entropy=be,
            loss=_finite(getattr(res, "loss", None)),
            predictions_after_update=post,
            predictions=preds,
            timings=timings,
        )

    @app.post(
        "/reset", response_model=ResetResponse, dependencies=admin, summary="Restore source state",
        responses={401: _err("missing token"), 403: _err("wrong token"), 404: _err("unknown stream"),
                   422: _err("invalid body")},
    )
    async def reset(req: ResetRequest) -> ResetResponse:
        _, store = svc.require_ready()
        if req.all:
            return ResetResponse(reset=await store.reset_all())
        sid = check_stream_id(req.stream_id or "")
        try:
            await store.reset(sid)
        except UnknownStream:
            raise ApiError(404, "unknown_stream", f"no stream {sid!r}") from None
        return ResetResponse(reset=[sid])

    @app.get("/streams", response_model=StreamList, dependencies=admin, summary="All known streams")
    async def streams() -> StreamList:
        _, store = svc.require_ready()
        return StreamList(streams=store.list(), **store.stats())

    @app.get(
        "/streams/{stream_id}", response_model=StreamInfo, dependencies=admin, summary="One stream",
        responses={404: _err("unknown stream")},
    )
    async def stream(stream_id: str) -> StreamInfo:
        _, store = svc.require_ready()
        sid = check_stream_id(stream_id)
        try:
            return StreamInfo(**store.info(sid))
        except UnknownStream:
            raise ApiError(404, "unknown_stream", f"no stream {sid!r}") from None

    @app.post(
        "/streams/{stream_id}/snapshot", response_model=StreamInfo, dependencies=admin,
        summary="Write the stream's snapshot now", responses={404: _err("unknown stream")},
    )
    async def snapshot(stream_id: str) -> StreamInfo:
        _, store = svc.require_ready()
        sid = check_stream_id(stream_id)
        try:
            return StreamInfo(**(await store.snapshot(sid)))
        except UnknownStream:
            raise ApiError(404, "unknown_stream", f"no stream {sid!r}") from None

    @app.delete(
        "/streams/{stream_id}", status_code=204, dependencies=admin,
        summary="Forget a stream and delete its snapshot", responses={404: _err("unknown stream")},
    )
    async def delete_stream(stream_id: str) -> Response:
        _, store = svc.require_ready()
        sid = check_stream_id(stream_id)
        try:
            await store.delete(sid)
        except UnknownStream:
            raise ApiError(404, "unknown_stream", f"no stream {sid!r}") from None
        return Response(status_code=204)

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded and warmed up", responses={503: _err("not ready")})
    async def readyz() -> dict[str, Any]:
        svc.require_ready()
        return {"status": "ready", "warmup_seconds": svc.warmup_seconds}

    @app.get("/info", summary="Model, method and limits")
    async def info() -> dict[str, Any]:
        rt = svc.runtime
        return {
            "version": __version__,
            "ready": svc.ready,
            "model": rt.info if rt is not None else None,
            "return_post_update": settings.return_post_update,
            "limits": {
                "max_images": settings.max_images,
                "max_body_bytes": settings.max_body_bytes,
                "max_image_pixels": settings.max_image_pixels,
                "max_concurrent_streams": settings.max_concurrent_streams,
                "max_queue_per_stream": settings.max_queue_per_stream,
                "max_queue_total": settings.max_queue_total,
                "state_budget_bytes": settings.state_budget_bytes,
                "idle_seconds": settings.idle_seconds,
            },
            "admin_token_required": svc.admin_token is not None,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        if svc.store is not None:
            svc.store._update_gauges()
        body, ctype = metrics.render()
        return Response(content=body, media_type=ctype)

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/docs")

    return app


class _HttpMetricsMiddleware:
    """Pure ASGI middleware: latency histogram and request counter by method, route template and status."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            labels = {"method": scope.get("method", ""), "route": path, "status": str(status["code"])}
            self.metrics.http_duration.labels(**labels).observe(time.perf_counter() - t0)
            self.metrics.http_requests.labels(**labels).inc()


__all__ = ["create_app", "ApiError", "Runtime", "load_runtime", "make_predictions"]
