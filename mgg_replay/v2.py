"""The load client's Open Inference Protocol (KServe V2 REST) transport: binary tensor requests and responses.

Why not ``tritonclient`` here: the load client runs on httpx threads (shared with ``/predict``), and tritonclient's
HTTP client brings gevent and its own connection pool; the two functions below are all the protocol the replay
needs (one binary UINT8 input, binary outputs), and ``tests/test_v2.py`` checks that :func:`encode_infer` writes
exactly the bytes ``tritonclient.http.InferenceServerClient.generate_request_body`` writes, and that
:func:`decode_infer` reads what the server answers the way tritonclient's ``InferResult`` does.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
INPUT_NAME = "images"
OUTPUT_NAMES = ("probabilities", "labels", "entropy")
_DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "UINT8": "|u1"}


def infer_path(model_name: str, version: str | None = None) -> str:
    return f"/v2/models/{model_name}" + (f"/versions/{version}" if version else "") + "/infer"


def encode_infer(images: np.ndarray, sequence_id: int | str, *, start: bool = False, end: bool = False,
                 outputs: Sequence[str] = OUTPUT_NAMES, request_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    """A V2 inference request: ``images`` (uint8 [N, H, W] or [N, H, W, C]) as binary tensor data on
    ``sequence_id``, the ``outputs`` asked for as binary data. Returns the body and its headers."""
    arr = np.ascontiguousarray(images, dtype=np.uint8)
    doc: dict[str, Any] = {}  # the key order and compact separators of tritonclient's requests
    if request_id:
        doc["id"] = request_id
    doc["inputs"] = [{"name": INPUT_NAME, "shape": list(arr.shape), "datatype": "UINT8",
                      "parameters": {"binary_data_size": arr.nbytes}}]
    doc["outputs"] = [{"name": n, "parameters": {"binary_data": True}} for n in outputs]
    doc["parameters"] = {"sequence_id": sequence_id, "sequence_start": start, "sequence_end": end}
    header = json.dumps(doc, separators=(",", ":")).encode()
    return header + arr.tobytes(), {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}


def decode_infer(content: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The response's JSON object and its output tensors (binary or JSON data) as numpy arrays."""
    hlen = headers.get(HEADER_LENGTH)
    n = int(hlen) if hlen is not None else len(content)
    doc = json.loads(content[:n])
    tensors: dict[str, np.ndarray] = {}
    offset = n
    for out in doc.get("outputs", []):
        dtype = np.dtype(_DTYPES[out["datatype"]])
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            arr = np.frombuffer(content, dtype=dtype, count=size // dtype.itemsize, offset=offset)
            offset += size
        else:
            arr = np.asarray(out["data"], dtype=dtype)
        tensors[out["name"]] = arr.reshape(out["shape"])
    return doc, tensors


def as_predict_body(doc: Mapping[str, Any], tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The fields of a ``/predict`` answer that the replay records, from a V2 response."""
    p = doc.get("parameters") or {}
    labels = tensors.get("labels")
    return {
        "step": p.get("step"), "adapted": p.get("adapted"), "skipped_reason": p.get("skipped_reason"),
        "batch_entropy": p.get("batch_entropy"), "rolled_back": p.get("rolled_back"),
        "predictions": [{"label": int(v)} for v in labels] if labels is not None else [],
    }


def served_model(client: Any, url: str) -> str:
    """The model name the server's V2 endpoint serves (``POST /v2/repository/index``)."""
    r = client.post(url + "/v2/repository/index", timeout=10)
    if r.status_code != 200 or not r.json():
        raise RuntimeError(f"{url}/v2/repository/index answered {r.status_code}: {r.text[:200]}")
    return str(r.json()[0]["name"])


__all__ = ["HEADER_LENGTH", "OUTPUT_NAMES", "as_predict_body", "decode_infer", "encode_infer", "infer_path",
           "served_model"]
