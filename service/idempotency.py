"""Idempotent requests: a retried request with the same ``Idempotency-Key`` is answered, not stepped again.

Contracts:

* A client may send ``Idempotency-Key: <key>`` (1-255 printable ASCII characters, no spaces) on ``POST /predict``
  and the V2 ``infer`` (there the request's JSON ``id`` can serve as the key too, when the setting
  ``idempotency_v2_request_id`` is on). Keys are per stream: the same key on another stream is another request.
* The check and the record happen inside the stream's own job, in the stream's order (a retry sent while its
  original is still queued or running waits for it, then is answered from its record): there is no window in which
  a request and its retry can both step.
* The answer of a keyed request (status, media type, protocol headers, body bytes) is kept in the stream's state
  (:attr:`mgg_core.state.StreamState.annotations`), so it is written with the very snapshot that makes the step
  durable: under ``durability="step"`` an acknowledged keyed request survives ``kill -9`` together with its answer,
  and a request whose step was lost (``durability="interval"``) is lost with its record, so its retry steps once.
* A repeated key with the same request is answered with the stored answer, byte for byte, and the header
  ``Idempotent-Replayed: true`` (``false`` on first answers); the stream does not step. "The same request" is the
  same decoded images (pixels, sizes, modes; a retry that re-encodes them or uses a new multipart boundary is still
  the same) and the same answer-shaping parameters of the protocol (e.g. V2 ``outputs``, ``sequence_start``).
* A repeated key with a different request is ``422 idempotency_key_reused`` and changes no state.
* Bounds: each stream keeps the records of its last ``idempotency_keys`` keys, in at most ``idempotency_max_bytes``
  bytes of records (oldest dropped first); a key whose record was dropped is new again. An answer larger than the
  byte cap alone is not kept: its record keeps the key, the request's fingerprint and the step, and a retry gets
  ``409 idempotent_answer_not_kept`` (the step was applied; it is not applied again).
* A reset to the source state (``POST /reset``, V2 ``sequence_start``, ``DELETE``) starts the stream over, its keys
  included (an exact reset equals a new stream). The engine's own returns to source (a guard fallback or hold, SAR
  recovery) are not resets: the keys stay.
* Records that cannot be read (a tampered snapshot) make keyed requests on that stream answer
  ``500 snapshot_restore_failed`` until it is reset; requests without a key are unaffected.

Why our own: FastAPI/Starlette have no idempotency support, and the records must live inside the stream's snapshot
to be exactly as durable as the step they describe, which no generic middleware or cache offers.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi.responses import Response

from .errors import ApiError

if TYPE_CHECKING:
    from mgg_core.state import StreamState

    from .decode import DecodedBatch

__all__ = [
    "ANNOTATION", "IDEMPOTENCY_HEADER", "REPLAY_HEADER", "Answer", "AnswerBook", "Idempotent", "Replay",
    "check_key", "fingerprint", "record_size",
]

IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
ANNOTATION = "idempotency"  # the key of the records in StreamState.annotations
KEY_RE = re.compile(r"^[\x21-\x7e]{1,255}$")


def check_key(value: str | None) -> str | None:
    """The key itself (None when absent), or 400 ``invalid_idempotency_key`` naming the rule."""
    if value is None:
        return None
    if not KEY_RE.fullmatch(value):
        raise ApiError(400, "invalid_idempotency_key", f"{IDEMPOTENCY_HEADER} must be 1-255 printable ASCII "
                       "characters without spaces")
    return value


def fingerprint(batch: DecodedBatch, params: dict[str, Any]) -> str:
    """SHA-256 of the decoded images (pixels, sizes, modes) and the answer-shaping ``params`` (JSON-able)."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode())
    if batch.array is not None:
        arr = batch.array
        h.update(f"npy {arr.dtype.str} {arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).data)
    else:
        for img in batch.images or []:
            h.update(f"img {img.mode} {img.size}".encode())
            h.update(img.tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Answer:
    """A response as sent: status, media type, protocol headers and the body bytes."""

    status: int
    media_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)

    def response(self, key: str, replayed: bool) -> Response:
        headers = {**self.headers, IDEMPOTENCY_HEADER: key, REPLAY_HEADER: "true" if replayed else "false"}
        return Response(self.body, status_code=self.status, media_type=self.media_type, headers=headers)


class Replay(Exception):
    """Raised inside the stream's job when the key was answered before: nothing stepped, ``answer`` is it."""

    def __init__(self, answer: Answer) -> None:
        super().__init__("replay")
        self.answer = answer


def record_size(record: dict[str, Any]) -> int:
    """Bytes a record takes in the snapshot (its compact JSON)."""
    return len(json.dumps(record, separators=(",", ":")))


class AnswerBook:
    """The records of one stream's last keys, oldest first, in ``state.annotations[ANNOTATION]`` (a JSON list).

    Args:
        max_keys: records kept (the oldest is dropped past it).
        max_bytes: bytes the records take together (oldest dropped past it; an answer that alone would pass it
            is kept without its body).
    """

    def __init__(self, max_keys: int, max_bytes: int) -> None:
        self.max_keys = int(max_keys)
        self.max_bytes = int(max_bytes)

    def records(self, state: StreamState, stream_id: str) -> list[dict[str, Any]]:
        raw = state.annotations.get(ANNOTATION)
        if raw is None:
            return []
        try:
            recs = json.loads(raw)
            if not isinstance(recs, list) or not all(
                    isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("fp"), str)
                    for r in recs):
                raise ValueError("not a list of records")
        except ValueError:
            raise ApiError(500, "snapshot_restore_failed", f"stream {stream_id!r}: its idempotency records cannot "
                           "be read; POST /reset this stream to start over") from None
        return recs

    def lookup(self, state: StreamState, stream_id: str, key: str, fp: str) -> Answer | None:
        """The stored answer of ``key``, None for a new key; 422 when the key came with another request, 409 when
        its answer was too large to keep."""
        rec = next((r for r in self.records(state, stream_id) if r["key"] == key), None)
        if rec is None:
            return None
        if rec["fp"] != fp:
            raise ApiError(422, "idempotency_key_reused", f"{IDEMPOTENCY_HEADER} {key!r} was used on stream "
                           f"{stream_id!r} for a different request (other images or parameters); use a new key")
        if rec.get("body") is None:
            raise ApiError(409, "idempotent_answer_not_kept", f"the request with {IDEMPOTENCY_HEADER} {key!r} was "
                           f"applied to stream {stream_id!r} (step {rec.get('step')}) but its answer was larger than "
                           f"idempotency_max_bytes ({self.max_bytes}) and was not kept; it is not applied again")
        try:
            return Answer(int(rec["status"]), str(rec["type"]), base64.b64decode(rec["body"], validate=True),
                          {str(k): str(v) for k, v in dict(rec.get("headers") or {}).items()})
        except (KeyError, TypeError, ValueError):
            raise ApiError(500, "snapshot_restore_failed", f"stream {stream_id!r}: its idempotency records cannot "
                           "be read; POST /reset this stream to start over") from None

    def remember(self, state: StreamState, stream_id: str, key: str, fp: str, step: int, answer: Answer) -> bool:
        """Record ``answer`` for ``key`` (the newest); drop the oldest records past the bounds. True when the
        answer's body was kept."""
        rec: dict[str, Any] = {"key": key, "fp": fp, "step": step, "status": answer.status, "type": answer.media_type,
                               "headers": answer.headers, "body": base64.b64encode(answer.body).decode("ascii")}
        if record_size(rec) + 2 > self.max_bytes:  # alone in its list
            rec.update(status=None, type=None, headers=None, body=None)
        recs = [r for r in self.records(state, stream_id) if r["key"] != key] + [rec]
        recs = recs[-self.max_keys:]
        sizes = [record_size(r) for r in recs]
        while len(recs) > 1 and sum(sizes) + len(recs) + 1 > self.max_bytes:  # + commas and brackets
            recs.pop(0)
            sizes.pop(0)
        state.annotations[ANNOTATION] = json.dumps(recs, separators=(",", ":"))
        return rec["body"] is not None


@dataclass(frozen=True)
class Idempotent:
    """What a keyed request adds to its step: its key and fingerprint, the stream's book, and how to render its
    answer from the step's outcome (in the job, so that the answer is persisted with the step)."""

    key: str
    fp: str
    book: AnswerBook
    render: Callable[[Any], Answer]

    def check(self, state: StreamState, stream_id: str) -> None:
        """Raise :class:`Replay` when the key was answered before (or a 4xx when it cannot be replayed)."""
        found = self.book.lookup(state, stream_id, self.key, self.fp)
        if found is not None:
            raise Replay(found)

    def record(self, state: StreamState, stream_id: str, outcome: Any) -> Answer:
        answer = self.render(outcome)
        self.book.remember(state, stream_id, self.key, self.fp, int(state.step), answer)
        return answer
