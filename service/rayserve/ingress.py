"""The HTTP ingress of the Ray backend: the service's HTTP API, each stream's calls sent in order to the shard
replica its id hashes to.

Contract.
* ``POST /predict``: once its body is read (as in the single-process service, the order of adaptation is the
  order in which bodies completed), the request takes its place in its stream's line; the line forwards one call
  at a time, in that order, to the shard deployment with ``session_id=<stream id>`` (:mod:`router`: strict
  hashing, no spill-over). The response is the shard's, plus ``X-Served-By: <replica id>``.
  Past ``max_queue_per_stream`` waiting requests on a stream or ``max_queue_total`` overall: 429.
  When the replica dies before answering, the call is retried (same request id: a replica that made the step
  durable before dying answers the retry with the stored response instead of stepping twice).
* ``POST /reset``, ``GET|DELETE /streams/{id}``, ``POST /streams/{id}/snapshot`` go to the stream's replica,
  through the same line. ``GET /streams`` and ``{"all": true}`` resets cover every replica; ``GET /metrics``
  merges every replica's ``tta_*`` metrics with a ``replica`` label (see ``metrics.py``).
* Admin endpoints need the admin token when one is set; errors have the service's body shape.
One ingress replica keeps each stream's arrival order; with several, order holds per ingress replica.
"""
# no `from __future__ import annotations`: Serve's ingress wrapper needs FastAPI to see real annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from ray import serve

from .. import __version__
from ..errors import ApiError, register_error_handlers
from ..idempotency import IDEMPOTENCY_HEADER
from ..metrics import LATENCY_BUCKETS
from ..routes.deps import check_admin, check_stream_id
from ..routes.predict import read_body
from ..settings import ServiceSettings
from ..v2.codec import (
    HEADER_LENGTH,
    INPUT,
    OUTPUTS,
    InferRequest,
    V2Error,
    encode_response,
    header_length,
    input_as_npy,
    parse_header,
    tensor_metadata,
)
from ..v2.routes import EXTENSIONS, MODEL_VERSION, PLATFORM, SERVER_NAME, v2_error
from .metrics import merge_replica_metrics
from .registry import replica_ids
from .router import target_key

log = logging.getLogger("mgg.service.ray")

SERVED_BY = "X-Served-By"
DEFAULT_STREAM = "default"
BROADCAST_TIMEOUT_S = 10.0  # /streams and /metrics skip a replica that does not answer within this
RETRYABLE = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "DeploymentUnavailableError")

api = FastAPI(title="MGG test-time adaptation service (Ray Serve backend)")


register_error_handlers(api)  # the service's error body for everything


def refuse_idempotency_key(request: Request) -> None:
    """400 for a keyed request: this backend keeps no per-stream answers, so a retry would step the stream again
    (the single-process service replays it; service/idempotency.py). Refused before the body is read."""
    if request.headers.get(IDEMPOTENCY_HEADER) is not None:
        raise ApiError(400, "idempotency_not_supported",
                       f"the Ray Serve backend does not keep {IDEMPOTENCY_HEADER} answers: send the request without "
                       "the header, or use the single-process service for idempotent retries")


class _Line:
    """One stream's arrival-ordered line: a chain of futures, each call waits for the one before it."""

    def __init__(self) -> None:
        self.tail: asyncio.Future | None = None
        self.waiting = 0


def _finish(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def _to_response(out: dict[str, Any]) -> Response:
    headers = {**out.get("headers", {}), SERVED_BY: str(out.get("served_by", ""))}
    if out["status"] == 204:
        return Response(status_code=204, headers=headers)
    return JSONResponse(out["body"], status_code=out["status"], headers=headers)


def running_replicas(app: str, deployment: str) -> list[str] | None:
    """Ids of the RUNNING replicas of ``app``/``deployment`` according to the Serve controller (None: unknown)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        if client is None:
            return None
        details = client.get_serve_details()
        reps = details["applications"][app]["deployments"][deployment]["replicas"]
    except (KeyError, TypeError, AttributeError, RuntimeError):
        return None
    return sorted(r["replica_id"] for r in reps if str(r.get("state")).endswith("RUNNING"))


@serve.ingress(api)
class Ingress:
    """Args:
    shard: handle of the shard deployment.
    settings: ``ServiceSettings.model_dump()``.
    shard_deployment: the shard deployment's name (for the router's replica list).
    request_timeout_s: limit on one call to a replica (including waiting for its stream's lease).
    retries: how often a call is retried when its replica died.
    """

    def __init__(self, shard: Any, settings: dict[str, Any], shard_deployment: str = "TTAShard",
                 request_timeout_s: float = 120.0, retries: int = 3) -> None:
        self.shard = shard
        self.settings = ServiceSettings(**settings)
        self.shard_deployment = shard_deployment
        self.app_name = serve.get_replica_context().app_name
        self.request_timeout_s = float(request_timeout_s)
        self.retries = int(retries)
        self.lines: dict[str, _Line] = {}
        self.model_card: dict[str, Any] | None = None  # a shard's whoami (model info), for the V2 endpoints
        self.total = 0
        admin = self.settings.admin_token
        self.admin_token = admin.get_secret_value() if admin is not None else None
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_duration = Histogram("tta_http_request_duration_seconds", "HTTP request latency at the ingress.",
                                       ["method", "route", "status"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.http_requests = Counter("tta_http_requests_total", "HTTP requests by route and status (ingress).",
                                     ["method", "route", "status"], registry=self.registry)
        self.rejected = Counter("tta_ingress_rejected_total", "Requests refused with 429 at the ingress.",
                                ["queue"], registry=self.registry)
        for queue in ("stream", "global"):
            self.rejected.labels(queue=queue)
        self.retried = Counter("tta_ingress_retries_total", "Calls retried because their replica died.",
                               registry=self.registry)

    # ------------------------------------------------------------------------------------------ plumbing

    def _admin(self, authorization: str | None) -> None:
        check_admin(self.admin_token, authorization)

    def _enter_line(self, sid: str, counted: bool) -> tuple[_Line, asyncio.Future | None, asyncio.Future]:
        line = self.lines.get(sid)
        if counted:
            s = self.settings
            if line is not None and line.waiting >= s.max_queue_per_stream:
                self.rejected.labels(queue="stream").inc()
                raise ApiError(429, "stream_queue_full", f"stream {sid!r} already has {line.waiting} requests "
                                f"queued (limit {s.max_queue_per_stream}); retry later",
                                {"Retry-After": str(s.retry_after_seconds)})
            if self.total >= s.max_queue_total:
                self.rejected.labels(queue="global").inc()
                raise ApiError(429, "queue_full", f"{self.total} requests queued (limit {s.max_queue_total}); "
                                "retry later", {"Retry-After": str(s.retry_after_seconds)})
        if line is None:
            line = self.lines[sid] = _Line()
        prev, mine = line.tail, asyncio.get_running_loop().create_future()
        line.tail = mine
        line.waiting += 1
        self.total += 1
        return line, prev, mine

    def _leave_line(self, sid: str, line: _Line, prev: asyncio.Future | None, mine: asyncio.Future) -> None:
        line.waiting -= 1
        self.total -= 1
        if prev is None or prev.done():
            mine.set_result(None)
        else:
            prev.add_done_callback(lambda _f: _finish(mine))
        if line.waiting == 0 and line.tail is mine and self.lines.get(sid) is line:
            del self.lines[sid]

    async def _call(self, key: str, method: str, *args: Any, timeout_s: float | None = None) -> dict[str, Any]:
        """Call ``method`` on the replica ``key`` routes to; retried when that replica died."""
        timeout_s = timeout_s or self.request_timeout_s
        for attempt in range(self.retries + 1):
            try:
                call = getattr(self.shard.options(session_id=key), method).remote(*args)
                return await asyncio.wait_for(call, timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(504, "replica_timeout", f"no answer from the stream's replica within "
                                f"{timeout_s:.0f}s", {"Retry-After": "5"}) from None
            except Exception as exc:
                names = {c.__name__ for c in type(exc).__mro__}
                if not names.intersection(RETRYABLE) or attempt == self.retries:
                    log.exception("call %s to the replica failed", method)
                    raise ApiError(503, "replica_unavailable", "the stream's replica is unavailable; retry",
                                    {"Retry-After": "1"}) from None
                self.retried.inc()
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _stream_call(self, sid: str, method: str, *args: Any, counted: bool = False) -> dict[str, Any]:
        """``method(sid, *args)`` on the stream's replica, after every earlier call of the stream (its line)."""
        line, prev, mine = self._enter_line(sid, counted)
        try:
            if prev is not None and not prev.done():
                await asyncio.shield(prev)
            return await self._call(sid, method, sid, *args)
        finally:
            self._leave_line(sid, line, prev, mine)

    async def _replicas(self) -> list[str]:
        """Running shard replicas: the Serve controller's view, else the router's."""
        ids = await asyncio.to_thread(running_replicas, self.app_name, self.shard_deployment)
        if ids is None:
            ids = replica_ids(self.shard_deployment)
            if not ids:  # the router is built on the first call
                await self._call(uuid.uuid4().hex, "whoami")
                ids = replica_ids(self.shard_deployment)
        return ids

    async def _broadcast(self, method: str) -> dict[str, dict[str, Any]]:
        """Call ``method`` on every running replica, one after the other (concurrent targeted calls were seen to
        stall in Ray 2.60's consistent-hash routing loop); a replica that does not answer is left out."""
        outs: dict[str, dict[str, Any]] = {}
        for r in await self._replicas():
            try:
                outs[r] = await self._call(target_key(r), method, timeout_s=BROADCAST_TIMEOUT_S)
            except ApiError as exc:
                log.warning("replica %s left out of %s: %s", r, method, exc.message)
        return outs

    def _observe(self, method: str, route: str, status: int, t0: float) -> None:
        labels = {"method": method, "route": route, "status": str(status)}
        self.http_duration.labels(**labels).observe(time.perf_counter() - t0)
        self.http_requests.labels(**labels).inc()

    # ------------------------------------------------------------------------------------------ endpoints

    @api.post("/predict")
    async def predict(self, request: Request,
                      x_stream_id: str = Header(DEFAULT_STREAM, alias="X-Stream-Id")) -> Response:
        t0, status = time.perf_counter(), 500
        try:
            sid = check_stream_id(x_stream_id)
            refuse_idempotency_key(request)
            # the body first, as in the single-process service: a slow upload holds no place in the stream's line,
            # and the order of adaptation is the order in which bodies completed
            body = await read_body(request, self.settings.max_body_bytes)
            payload = (body, request.headers.get("content-type"), uuid.uuid4().hex)
            out = await self._stream_call(sid, "predict", *payload, counted=True)
            status = out["status"]
            return _to_response(out)
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self._observe("POST", "/predict", status, t0)

    @api.post("/reset")
    async def reset(self, request: Request, authorization: str | None = Header(None)) -> Response:
        self._admin(authorization)
        try:
            req = await request.json()
        except ValueError:
            raise ApiError(422, "invalid_request", "the body must be JSON") from None
        if not isinstance(req, dict) or bool(req.get("stream_id")) == bool(req.get("all")):
            raise ApiError(422, "invalid_request", 'give either "stream_id" or "all": true')
        if req.get("all"):
            done = []
            for sid in sorted((await self._list())["streams_by_id"]):
                out = await self._stream_call(sid, "reset")
                if out["status"] == 200:
                    done.append(sid)
            return JSONResponse({"reset": done})
        sid = check_stream_id(str(req["stream_id"]))
        return _to_response(await self._stream_call(sid, "reset"))

    async def _list(self) -> dict[str, Any]:
        outs = await self._broadcast("list_streams")
        by_id: dict[str, dict[str, Any]] = {}
        for out in outs.values():
            for sid, info in out["body"]["on_disk"].items():
                by_id.setdefault(sid, info)
        for out in outs.values():  # the lease holder's live view wins over disk metadata
            for sid, info in out["body"]["owned"].items():
                if by_id.get(sid, {}).get("served_by") in (None, info["served_by"]) or not by_id[sid]["resident"]:
                    by_id[sid] = info
        stats = [o["body"]["stats"] for o in outs.values()]
        return {"streams_by_id": by_id, "stats": stats, "replicas": sorted(outs)}

    @api.get("/streams")
    async def streams(self, authorization: str | None = Header(None)) -> JSONResponse:
        self._admin(authorization)
        listing = await self._list()
        stats = listing["stats"]
        body = {
            "streams": [listing["streams_by_id"][k] for k in sorted(listing["streams_by_id"])],
            "streams_known": len(listing["streams_by_id"]),
            "streams_resident": sum(s["streams_resident"] for s in stats),
            "state_bytes": sum(s["state_bytes"] for s in stats),
            "state_budget_bytes": sum(s["state_budget_bytes"] for s in stats),
            "queue_depth": self.total,
            "replicas": listing["replicas"],
        }
        return JSONResponse(body)

    @api.get("/streams/{stream_id}")
    async def stream(self, stream_id: str, authorization: str | None = Header(None)) -> Response:
        self._admin(authorization)
        return _to_response(await self._stream_call(check_stream_id(stream_id), "info"))

    @api.post("/streams/{stream_id}/snapshot")
    async def snapshot(self, stream_id: str, authorization: str | None = Header(None)) -> Response:
        self._admin(authorization)
        return _to_response(await self._stream_call(check_stream_id(stream_id), "snapshot"))

    @api.delete("/streams/{stream_id}")
    async def delete_stream(self, stream_id: str, authorization: str | None = Header(None)) -> Response:
        self._admin(authorization)
        return _to_response(await self._stream_call(check_stream_id(stream_id), "delete"))

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> dict[str, Any]:
        out = await self._call(uuid.uuid4().hex, "whoami")
        return {"status": "ready", "warmup_seconds": out["body"]["warmup_seconds"], "backend": "ray"}

    @api.get("/info")
    async def info(self) -> dict[str, Any]:
        out = await self._call(uuid.uuid4().hex, "whoami")
        s = self.settings
        return {"ready": True, "backend": "ray", "model": out["body"]["info"],
                "replicas": await self._replicas(), "return_post_update": s.return_post_update,
                "limits": {"max_images": s.max_images, "max_body_bytes": s.max_body_bytes,
                           "max_image_pixels": s.max_image_pixels, "max_concurrent_streams": s.max_concurrent_streams,
                           "max_queue_per_stream": s.max_queue_per_stream, "max_queue_total": s.max_queue_total,
                           "state_budget_bytes": s.state_budget_bytes, "idle_seconds": s.idle_seconds},
                "admin_token_required": self.admin_token is not None}

    # ------------------------------------------------------------------------- Open Inference Protocol (V2)

    async def _v2(self, fn: Callable[..., Awaitable[Response]], *args: Any) -> Response:
        """Run a V2 endpoint: its errors (the codec's, the ingress's, a replica's) as ``{"error": message}``."""
        try:
            return await fn(*args)
        except V2Error as exc:
            return v2_error(exc.status, exc.message, exc.headers)
        except ApiError as exc:
            return v2_error(exc.status, exc.message, exc.headers)

    async def _model(self, name: str, version: str | None, *, ask: bool = True) -> dict[str, Any]:
        """A replica's ``whoami`` when ``name``/``version`` is the served model; else 404 (503: no replica).
        ``ask=False`` reuses the last answer (every replica serves the same model): no extra call per infer."""
        if ask or self.model_card is None:
            self.model_card = dict((await self._call(uuid.uuid4().hex, "whoami"))["body"])
        card = self.model_card
        known = self.settings.model_name or str(card["info"]["model"])
        if name != known:
            raise V2Error(404, f"unknown model {name!r}; this server serves {known!r}")
        if version is not None and version != MODEL_VERSION:
            raise V2Error(404, f"unknown version {version!r} of model {name!r}; its only version is {MODEL_VERSION!r}")
        return card

    async def _v2_metadata(self, name: str, version: str | None) -> Response:
        n = int((await self._model(name, version))["num_classes"])
        return JSONResponse({"name": name, "versions": [MODEL_VERSION], "platform": PLATFORM,
                             "inputs": [tensor_metadata(INPUT, n)],
                             "outputs": [tensor_metadata(spec, n) for spec in OUTPUTS.values()]})

    async def _v2_ready(self, name: str, version: str | None) -> Response:
        try:
            await self._model(name, version)
        except ApiError as exc:  # no replica answers: known model, not ready
            return JSONResponse({"name": name, "ready": False, "error": exc.message}, status_code=503,
                                headers=exc.headers)
        return JSONResponse({"name": name, "ready": True})

    async def _v2_request(self, request: Request) -> tuple[InferRequest, bytes]:
        """Read and parse the V2 request (``service.v2.codec``); its input as ``.npy`` bytes. 4xx before any
        stream is touched."""
        try:
            refuse_idempotency_key(request)
        except ApiError as exc:
            raise V2Error(exc.status, exc.message) from None
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise V2Error(415, f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")
        body = await read_body(request, self.settings.max_body_bytes)
        hlen = header_length(request.headers.get(HEADER_LENGTH), len(body)) or len(body)
        req = parse_header(body[:hlen], binary_size=len(body) - hlen)
        return req, await asyncio.to_thread(input_as_npy, req, memoryview(body)[hlen:])

    async def _v2_infer(self, request: Request, name: str, version: str | None) -> Response:
        t0, status = time.perf_counter(), 500
        try:
            await self._model(name, version, ask=False)
            req, npy = await self._v2_request(request)
            args = (npy, uuid.uuid4().hex, req.sequence_id, req.sequence_start, req.sequence_end)
            out = await self._stream_call(req.stream_id, "infer_v2", *args, counted=True)
            status = out["status"]
            served = {SERVED_BY: str(out.get("served_by", ""))}
            if status != 200:
                err = out["body"]["error"] if isinstance(out.get("body"), dict) else {}
                return v2_error(status, str(err.get("message", "request failed")), {**out["headers"], **served})
            tensors = {k: np.asarray(v, dtype=OUTPUTS[k].dtype) for k, v in out["body"]["tensors"].items()}
            content, headers = encode_response(model_name=name, model_version=MODEL_VERSION, request_id=req.id,
                                               parameters=out["body"]["parameters"], tensors=tensors,
                                               outputs=req.outputs)
            return Response(content=content, media_type=headers.pop("Content-Type"), headers={**headers, **served})
        except (V2Error, ApiError) as exc:
            status = exc.status
            raise
        finally:
            self._observe("POST", "/v2/models/{model_name}/infer", status, t0)

    @api.get("/v2")
    async def v2_server(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}

    @api.get("/v2/health/live")
    async def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_health_ready(self) -> Response:
        try:
            await self._call(uuid.uuid4().hex, "whoami")
        except ApiError as exc:
            return JSONResponse({"ready": False, "error": exc.message}, status_code=503, headers=exc.headers)
        return JSONResponse({"ready": True})

    @api.get("/v2/models/{model_name}")
    async def v2_model(self, model_name: str) -> Response:
        return await self._v2(self._v2_metadata, model_name, None)

    @api.get("/v2/models/{model_name}/versions/{model_version}")
    async def v2_model_version(self, model_name: str, model_version: str) -> Response:
        return await self._v2(self._v2_metadata, model_name, model_version)

    @api.get("/v2/models/{model_name}/ready")
    async def v2_model_ready(self, model_name: str) -> Response:
        return await self._v2(self._v2_ready, model_name, None)

    @api.get("/v2/models/{model_name}/versions/{model_version}/ready")
    async def v2_model_version_ready(self, model_name: str, model_version: str) -> Response:
        return await self._v2(self._v2_ready, model_name, model_version)

    @api.post("/v2/models/{model_name}/infer")
    async def v2_infer(self, request: Request, model_name: str) -> Response:
        return await self._v2(self._v2_infer, request, model_name, None)

    @api.post("/v2/models/{model_name}/versions/{model_version}/infer")
    async def v2_infer_version(self, request: Request, model_name: str, model_version: str) -> Response:
        return await self._v2(self._v2_infer, request, model_name, model_version)

    @api.get("/metrics")
    async def metrics(self) -> Response:
        outs = await self._broadcast("metrics_text")
        merged = merge_replica_metrics({r: o["body"] for r, o in outs.items()}, skip=("tta_http_",))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(merged)
        body = generate_latest(self.registry) + generate_latest(registry)
        return Response(content=body, media_type=CONTENT_TYPE_LATEST)


__all__ = ["Ingress", "SERVED_BY", "ApiError", "api"]
