"""Pydantic models of the HTTP API: request and response bodies, and the one error body shape.

Contract: these classes are the OpenAPI schema; renaming a field or a class changes the public API.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator


class ErrorDetail(BaseModel):
    code: str = Field(..., examples=["invalid_image"])
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_doc(description: str) -> dict[str, Any]:
    """An OpenAPI ``responses`` entry for an error status: the shared error body and a description."""
    return {"model": ErrorBody, "description": description}


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
    hold_released: str | None = Field(
        None, description="the guard ended a hold at source early after this batch (domain_shift, source_failing)")
    hold_images: float | None = Field(
        None, description="this batch's guard fallback holds the stream at source (no adaptation) for this many "
        "images, or null (no fallback, or one that adapts on from a restored state)")
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
    unpersisted_steps: int = Field(0, description="acknowledged steps not yet on disk (always 0 with durability=step)")
    error: str | None = Field(None, description="why the stream's files cannot be restored (POST /reset fixes it)")


class StreamList(BaseModel):
    streams: list[StreamInfo] = Field(..., description="one page, sorted by stream id")
    next_after: str | None = Field(None, description="pass as ?after= for the next page; null on the last page")
    streams_known: int
    streams_resident: int
    state_bytes: int
    state_budget_bytes: int
    queue_depth: int
    snapshot_bytes: int = Field(0, description="bytes of snapshots on disk")
    snapshot_budget_bytes: int = Field(0, description="max_snapshot_bytes")
    steps_unpersisted: int = Field(0, description="acknowledged steps of all streams not yet on disk")


__all__ = [
    "ErrorBody", "ErrorDetail", "Prediction", "PredictResponse", "ResetRequest", "ResetResponse", "StreamInfo",
    "StreamList", "TopK", "error_doc",
]
