"""The protocol-independent inference path: "classify this batch on stream X, then adapt X on it".

Routes for a protocol (today ``POST /predict``; later the Open Inference Protocol V2 beside it) read and decode
their own request format, then call the same :class:`DataPlane`:

1. :meth:`DataPlane.reserve` fixes the request's place in the stream's queue once its body has arrived (a slow or
   silent upload holds no queue slot; requests are adapted in the order their bodies completed) or answers
   429/503/507;
2. :meth:`DataPlane.step` preprocesses a decoded batch, runs ``engine.step`` (and ``engine.predict`` when
   predictions after the update are configured) under the stream's lock, records metrics and returns a
   :class:`StepOutcome` (logits, their :class:`Outputs`, step, engine result; the outputs computed in the step's
   worker thread, not on the event loop); with ``fused_steps`` the step goes through the
   :class:`~service.scheduler.FusedScheduler` (``store.run_fused``), fused with other streams' steps into one
   ``engine.step_many`` call, with the same answer; :meth:`DataPlane.infer` wraps it into the V1
   :class:`~service.schemas.PredictResponse`, the V2 routes (:mod:`service.v2`) into V2 output tensors.

The caller must call ``ticket.abandon()`` in a ``finally`` (a no-op once :meth:`infer` owns the ticket).
"""
from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from .decode import DecodedBatch, DecodeError, decode_body, probe_body
from .errors import ApiError
from .idempotency import Answer, AnswerBook, Idempotent, Replay, fingerprint
from .runtime import Runtime, ServiceState
from .schemas import PredictResponse
from .store import PersistError, Refused, SnapshotRestoreError, StoreBusy, StoreClosed, StoreFull, StreamStore, Ticket

if TYPE_CHECKING:
    import torch

    from mgg_core.engine import StepResult
    from mgg_core.state import StreamState


def softmax_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (N x C) and prediction entropies in nats (N), float32 on the CPU: the numbers every
    protocol answers, computed in one place so that /predict and /v2 agree bit for bit."""
    import torch

    logits = logits.detach().float().cpu()
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    ent = -(p * logp).nan_to_num(0.0).sum(dim=1)
    return p, ent


@dataclass(frozen=True)
class Outputs:
    """What every protocol answers about one step's images, computed once and off the event loop (in the step's
    worker thread, where the step's own torch calls run: a torch call releases the GIL, and on the event loop each
    one would queue behind the busy worker threads for the GIL again). ``probs``: softmax probabilities (N x C),
    ``entropy``: prediction entropies in nats (N), both float32 CPU tensors (:func:`softmax_outputs`);
    ``top_p`` / ``top_i``: each row's ``topk`` best scores and labels, best first; ``entropies``: ``entropy`` as
    floats (Python lists, for the JSON answer). Ties rank the lower class index first, so a row's label is its
    argmax whatever ``topk`` is, and /predict's and /v2's labels agree."""

    probs: torch.Tensor
    entropy: torch.Tensor
    top_p: list[list[float]]
    top_i: list[list[int]]
    entropies: list[float]

    @classmethod
    def of(cls, logits: torch.Tensor, topk: int) -> Outputs:
        """The outputs of ``logits`` (N x C).

        Args:
            logits: the answered logits of one step.
            topk: how many best classes each row lists (at most C).
        """
        import torch

        p, ent = softmax_outputs(logits)
        top_p, top_i = torch.sort(p, dim=1, descending=True, stable=True)  # stable: ties by class index
        k = min(topk, p.shape[1])
        return cls(p, ent, top_p[:, :k].tolist(), top_i[:, :k].tolist(), ent.tolist())


def predictions(outputs: Outputs, class_names: list[str]) -> list[dict[str, Any]]:
    """Per-row label, class name, softmax score, entropy (nats) and the top-k best classes (pure Python: no torch
    call on the event loop)."""
    out = []
    for idx, sc, ent in zip(outputs.top_i, outputs.top_p, outputs.entropies, strict=True):
        out.append(
            {
                "label": idx[0],
                "class_name": class_names[idx[0]],
                "score": sc[0],
                "entropy": ent,
                "topk": [{"label": i, "class_name": class_names[i], "score": s} for i, s in zip(idx, sc, strict=True)],
            }
        )
    return out


def make_predictions(logits: torch.Tensor, class_names: list[str], topk: int) -> list[dict[str, Any]]:
    """Per-row label, class name, softmax score, entropy (nats) and the ``topk`` best classes of ``logits``."""
    return predictions(Outputs.of(logits, topk), class_names)


def persist_error(exc: PersistError) -> ApiError:
    """507 for a durable write that failed: the disk cap (``snapshot_disk_full``) or the disk itself."""
    return ApiError(507, "snapshot_disk_full" if exc.disk_full else "snapshot_write_failed", exc.message)


def finite(v: float | None) -> float | None:
    """``v`` as a float, or None when it is missing or not finite (JSON has no NaN)."""
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class StepOutcome:
    """What one step on a stream gives every protocol: the engine's result, the answered logits (CPU, float32;
    before the update unless ``post_update``), their :class:`Outputs` and the stream's step count after it."""

    result: StepResult
    logits: torch.Tensor
    outputs: Outputs
    step: int
    post_update: bool
    answer: Answer | None = None  # a keyed request's answer, rendered and recorded in the job


class DataPlane:
    """Predict-and-adapt on a stream, shared by every protocol's routes."""

    def __init__(self, svc: ServiceState) -> None:
        self.svc = svc

    def ready(self) -> tuple[Runtime, StreamStore]:
        return self.svc.require_ready()

    async def decode(self, body: bytes, content_type: str | None) -> DecodedBatch:
        """Decode a ``POST /predict`` body within the limits (:func:`service.decode.decode_body`; 4xx as
        :class:`~service.errors.ApiError`). A small body is probed on the event loop and, when its images hold at
        most ``inline_max_pixels`` pixels, decoded there too; anything larger is decoded in a worker thread."""
        svc, inline = self.svc, self.svc.settings.inline_max_pixels
        try:
            if len(body) > 4 * inline:  # parsing a large body, or decoding many pixels, would hold up the loop
                return await asyncio.to_thread(decode_body, body, content_type, svc.limits, svc.pixels)
            probed = probe_body(body, content_type, svc.limits, svc.pixels)
            return probed.decode() if probed.pixels <= inline else await asyncio.to_thread(probed.decode)
        except DecodeError as exc:
            raise ApiError(exc.status, exc.code, exc.message, exc.headers) from None

    def reserve(self, store: StreamStore, stream_id: str) -> Ticket:
        """A place in ``stream_id``'s queue, or 429 (a queue is full) / 503 (shutting down)."""
        try:
            return store.reserve(stream_id)
        except StoreBusy as exc:
            code = "stream_queue_full" if exc.queue == "stream" else "queue_full"
            retry = {"Retry-After": str(self.svc.settings.retry_after_seconds)}
            raise ApiError(429, code, exc.message, retry) from None
        except StoreFull as exc:
            raise ApiError(507, exc.code, exc.message) from None
        except StoreClosed as exc:
            raise ApiError(503, "shutting_down", str(exc), {"Retry-After": "5"}) from None

    async def step(
        self, rt: Runtime, store: StreamStore, ticket: Ticket, batch: DecodedBatch, timings: dict[str, float],
        *, reset_first: bool = False, idem: Idempotent | None = None,
    ) -> StepOutcome:
        """Preprocess the decoded ``batch`` (on the event loop when its images, and as many model inputs, have at most
        ``inline_max_pixels`` pixels, else in a worker thread), step the stream under its lock, record metrics;
        ``timings`` gains phases.

        The batch's decoded images (and their share of the in-flight pixel budget) are released as soon as they
        are preprocessed: a request waiting for its stream's turn holds only the model-sized input tensor.
        ``reset_first`` restores the stream's source state exactly (``engine.reset``) inside the same job, just
        before the step: in the stream's order, after every earlier request of the stream (the V2 protocol's
        ``sequence_start``).
        ``idem`` (a request with an ``Idempotency-Key``, :mod:`service.idempotency`): in the same job, before
        anything changes, a key answered before raises :class:`~service.idempotency.Replay` (nothing steps); else
        the answer is rendered after the step and recorded in the state, persisted with it.
        """
        settings = self.svc.settings
        t0 = time.perf_counter()
        try:  # a small batch on the event loop (see decode)
            # the work is the larger of the decoded pixels and the model's input pixels (a small image is resized up)
            if max(batch.pixels, len(batch) * rt.input_size[-1] * rt.input_size[-2]) <= settings.inline_max_pixels:
                x = rt.preprocessor(batch.payload)
            else:
                x = await asyncio.to_thread(rt.preprocessor, batch.payload)
        except (ValueError, TypeError, OSError) as exc:
            raise ApiError(400, "invalid_image", f"cannot preprocess the images: {exc}") from None
        finally:
            batch.release()
        timings["preprocess"] = time.perf_counter() - t0
        post = settings.return_post_update
        engine = rt.engine

        def before(state: StreamState) -> None:
            if idem is not None:  # a key answered before: Replay (or a 4xx), nothing changes
                try:
                    idem.check(state, ticket.entry.id)
                except (Replay, ApiError) as exc:
                    raise Refused(exc) from None
            if reset_first:
                engine.reset(state)

        def after(state: StreamState, res: StepResult) -> StepOutcome:
            logits = engine.predict(state, x.to(rt.device, non_blocking=True)) if post else res.logits
            logits = logits.detach().float().cpu()
            out = StepOutcome(res, logits, Outputs.of(logits, settings.topk), int(state.step), post)
            if idem is not None:  # recorded in the state: persisted with the step
                out.answer = idem.record(state, ticket.entry.id, out)
            return out

        def adapt(state: StreamState) -> StepOutcome:
            before(state)
            return after(state, engine.step(state, x.to(rt.device, non_blocking=True)))

        sched = self.svc.scheduler
        try:
            if sched is None:
                out = await store.run(ticket, adapt)
            else:  # fused with other streams' steps (service.scheduler), in this stream's order
                out = await store.run_fused(
                    ticket, lambda state: sched.submit(ticket.stream_id, state, x, before=before, after=after))
                sched.answered(ticket.stream_id)  # durable and about to be answered: its think time starts
        except SnapshotRestoreError as exc:
            hint = "" if "POST /reset" in exc.message else "; POST /reset this stream to start over"
            raise ApiError(500, "snapshot_restore_failed", exc.message + hint) from None
        except PersistError as exc:
            raise persist_error(exc) from None
        if reset_first:
            self.svc.metrics.resets.labels(reason="sequence_start").inc()
        self._record(out.result, int(out.logits.shape[0]), timings)
        return out

    async def step_idempotent(
        self, rt: Runtime, store: StreamStore, ticket: Ticket, batch: DecodedBatch, timings: dict[str, float],
        key: str, params: dict[str, Any], render: Callable[[StepOutcome], Answer], *, reset_first: bool = False,
    ) -> tuple[StepOutcome | None, Answer, bool]:
        """:meth:`step` for a request with an ``Idempotency-Key``: (outcome, answer, False) when it stepped, (None,
        the stored answer, True) when the key was answered before. ``params``: what besides the images shapes the
        answer (part of the request's fingerprint); ``render``: the answer of an outcome."""
        settings = self.svc.settings
        fp = await asyncio.to_thread(fingerprint, batch, params)
        book = AnswerBook(settings.idempotency_keys, settings.idempotency_max_bytes)
        try:
            out = await self.step(rt, store, ticket, batch, timings, reset_first=reset_first,
                                  idem=Idempotent(key, fp, book, render))
        except Replay as replay:
            self.svc.metrics.replays.inc()
            return None, replay.answer, True
        assert out.answer is not None
        return out, out.answer, False

    async def infer(
        self, rt: Runtime, store: StreamStore, ticket: Ticket, stream_id: str, batch: DecodedBatch,
        timings: dict[str, float],
    ) -> PredictResponse:
        """Step the stream on the decoded ``batch`` (:meth:`step`) and answer as ``POST /predict`` does."""
        return self.predict_response(rt, stream_id, await self.step(rt, store, ticket, batch, timings), timings)

    async def infer_idempotent(
        self, rt: Runtime, store: StreamStore, ticket: Ticket, stream_id: str, batch: DecodedBatch,
        timings: dict[str, float], key: str,
    ) -> Response:
        """:meth:`infer` for a request with an ``Idempotency-Key``: the first answer, or the stored one replayed
        (:mod:`service.idempotency`); the body is the same JSON as :meth:`infer`'s."""

        def render(out: StepOutcome) -> Answer:
            phases = {**timings, **{k: float(v) for k, v in out.result.timings.items()}}
            body = self.predict_response(rt, stream_id, out, phases).model_dump_json().encode()
            return Answer(200, "application/json", body)

        _, answer, replayed = await self.step_idempotent(rt, store, ticket, batch, timings, key, {"route": "predict"},
                                                         render)
        return answer.response(key, replayed)

    def predict_response(
        self, rt: Runtime, stream_id: str, out: StepOutcome, timings: dict[str, float],
    ) -> PredictResponse:
        """The ``POST /predict`` answer of one step."""
        res = out.result
        preds = predictions(out.outputs, rt.class_names)
        return PredictResponse(
            stream_id=stream_id,
            step=out.step,
            adapted=bool(res.adapted),
            skipped_reason=None if res.adapted else res.skipped_reason,
            rolled_back=res.rolled_back,
            rollback_reason=res.rollback_reason if res.rolled_back else None,
            reset_reason=res.reset_reason,
            hold_released=res.hold_released,
            hold_images=res.hold_images,
            batch_entropy=finite(res.batch_entropy),
            loss=finite(res.loss),
            predictions_after_update=out.post_update,
            predictions=preds,  # pydantic validates the dicts into Prediction
            timings=timings,
        )

    def _record(self, res: StepResult, n_images: int, timings: dict[str, float]) -> None:
        """Metrics of one request; the engine's own phase timings are merged into ``timings``."""
        metrics = self.svc.metrics
        metrics.images.inc(n_images)
        for phase, sec in timings.items():
            metrics.observe_phase(phase, sec)
        for phase, sec in res.timings.items():
            timings[phase] = float(sec)
            metrics.observe_phase(phase, sec)
        if res.adapted:
            metrics.steps.inc()
        else:  # methods without gradient steps (noadapt, bn) report no reason
            metrics.child(metrics.skipped, str(res.skipped_reason or "method_takes_no_step")).inc()
        if res.reset_reason:
            metrics.resets.labels(reason=str(res.reset_reason)).inc()
        be = finite(res.batch_entropy)
        if be is not None:
            metrics.batch_entropy.observe(be)
        if res.rolled_back:
            metrics.rollbacks.labels(reason=str(res.rollback_reason or "unknown")).inc()
        if res.hold_images is not None:
            metrics.holds.labels(reason=str(res.rollback_reason or "unknown")).inc()
        if res.hold_released:
            metrics.hold_releases.labels(reason=str(res.hold_released)).inc()


__all__ = ["DataPlane", "Outputs", "StepOutcome", "finite", "make_predictions", "persist_error", "predictions",
           "softmax_outputs"]
