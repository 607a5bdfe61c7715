"""The predict path of one shard replica: decode, preprocess, one ordered adaptation step, the response body.

Contract: the same steps and the same response body as the single-process ``POST /predict`` (``service.app``);
a body that fails to decode or preprocess answers a 4xx error and never touches the stream's state.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from ..decode import DecodeError, DecodeLimits, decode_body


async def run_predict(rt: Any, store: Any, settings: Any, metrics: Any, sid: str, body: bytes,
                      content_type: str | None) -> dict[str, Any]:
    from ..app import PredictResponse, _finite, make_predictions
    from .shard import error, reply

    ticket = store.reserve(sid)
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        limits = DecodeLimits(max_images=settings.max_images, max_image_pixels=settings.max_image_pixels)
        try:
            batch = await asyncio.to_thread(decode_body, body, content_type, limits)
        except DecodeError as exc:
            return error(exc.status, exc.code, exc.message)
        timings["decode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            x = await asyncio.to_thread(rt.preprocessor, batch.payload)
        except (ValueError, TypeError, OSError) as exc:
            return error(400, "invalid_image", f"cannot preprocess the images: {exc}")
        timings["preprocess"] = time.perf_counter() - t0
        post, engine = settings.return_post_update, rt.engine

        def adapt(state: Any) -> tuple[Any, list[dict[str, Any]], int]:
            xd = x.to(rt.device, non_blocking=True)
            res = engine.step(state, xd)
            logits = engine.predict(state, xd) if post else res.logits
            return res, make_predictions(logits, rt.class_names, settings.topk), int(state.step)

        res, preds, step = await store.run(ticket, adapt)
    finally:
        ticket.abandon()

    metrics.images.inc(len(preds))
    for phase, sec in timings.items():
        metrics.observe_phase(phase, sec)
    for phase, sec in (getattr(res, "timings", None) or {}).items():
        timings[phase] = float(sec)
        metrics.observe_phase(phase, sec)
    if res.adapted:
        metrics.steps.inc()
    else:
        metrics.skipped.labels(reason=str(res.skipped_reason or "method_takes_no_step")).inc()
    reset_reason = getattr(res, "reset_reason", None)
    if reset_reason:
        metrics.resets.labels(reason=str(reset_reason)).inc()
    be = _finite(getattr(res, "batch_entropy", None))
    if be is not None:
        metrics.batch_entropy.observe(be)
    rolled_back = bool(getattr(res, "rolled_back", False))
    if rolled_back:
        metrics.rollbacks.labels(reason=str(getattr(res, "rollback_reason", None) or "unknown")).inc()
    out = PredictResponse(
        stream_id=sid, step=step, adapted=bool(res.adapted), skipped_reason=None if res.adapted else res.skipped_reason,
        rolled_back=rolled_back, rollback_reason=getattr(res, "rollback_reason", None) if rolled_back else None,
        reset_reason=reset_reason, batch_entropy=be, loss=_finite(getattr(res, "loss", None)),
        predictions_after_update=post, predictions=preds, timings=timings,
    )
    return reply(200, out.model_dump(mode="json"))


__all__ = ["run_predict"]
