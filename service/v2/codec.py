"""Open Inference Protocol (KServe V2 REST) bodies <-> numpy: pure functions, no HTTP framework, no model state.

Contract:

- :func:`parse_header` validates the JSON inference request object (the whole body, or its first
  ``Inference-Header-Content-Length`` bytes with the binary tensor data extension) into an :class:`InferRequest`:
  request parameters (``sequence_id``/``sequence_start``/``sequence_end``, ``binary_data_output``), the one input's
  metadata and the requested outputs. Tensor data is not converted yet, so the stream can be queued first.
- :func:`input_as_npy` turns the input tensor (JSON ``data``, flat or nested, or its binary bytes) into ``.npy``
  bytes for :func:`service.decode.decode_npy`: the V2 input then passes the very checks and limits of an npy body on
  ``POST /predict`` (rank, channels, image count, pixels per image), one code path below the protocol layer.
- :func:`encode_response` writes the inference response object, with binary outputs after the JSON header when
  any output asks for them (``binary_data`` on the output, else the request's ``binary_data_output``).

Every problem is a :class:`V2Error` (status, message): the route answers it as ``{"error": message}``.
The model's tensors are declared as data (:data:`INPUT`, :data:`OUTPUTS`); parameters as :data:`REQUEST_PARAMETERS`.
"""
from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from ..store import valid_stream_id

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_SEQUENCE_ID = 2**64 - 1


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the model's signature: its name, V2 datatype, little-endian numpy dtype, metadata shape."""

    name: str
    datatype: str
    dtype: str
    shape: tuple[int, ...]  # -1: variable; "C" of an output is filled in from the model (see tensor_metadata)
    doc: str = ""


INPUT = TensorSpec("images", "UINT8", "|u1", (-1, -1, -1, -1),
                   "uint8 images, shape [N, H, W] or [N, H, W, C] with C = 1, 3 or 4 (any H, W: resized)")
OUTPUTS: dict[str, TensorSpec] = {
    "probabilities": TensorSpec("probabilities", "FP32", "<f4", (-1, -2), "softmax probabilities, [N, classes]"),
    "labels": TensorSpec("labels", "INT64", "<i8", (-1,), "argmax class index, [N]"),
    "entropy": TensorSpec("entropy", "FP32", "<f4", (-1,), "prediction entropy in nats, [N]"),
}
NUM_CLASSES_DIM = -2  # placeholder in OUTPUTS' shapes for the number of classes

# request parameter -> what it does; anything else is refused (a typo must not silently do nothing)
REQUEST_PARAMETERS: dict[str, str] = {
    "sequence_id": "the stream: a non-zero uint64 or a non-empty string of 1-128 of A-Za-z0-9._- (same stream as "
                   "X-Stream-Id on /predict; 42 and \"42\" are one stream)",
    "sequence_start": "true: reset the stream to the source model exactly before this batch",
    "sequence_end": "true: snapshot the stream to disk and unload it from memory after this batch",
    "binary_data_output": "true: outputs as binary data unless an output says otherwise",
    "priority": "accepted and ignored (one queue per stream, in arrival order)",
    "timeout": "accepted and ignored",
}
INPUT_PARAMETERS = {"binary_data_size"}
OUTPUT_PARAMETERS = {"binary_data"}


class V2Error(Exception):
    """A request the protocol layer refuses: answered as ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


# ------------------------------------------------------------------------------------------- request


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    shape: list[StrictInt]
    datatype: StrictStr
    parameters: dict[str, Any] | None = None
    data: Any = None


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    parameters: dict[str, Any] | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "model_name" in some clients' bodies
    id: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[_Input] = Field(..., min_length=1)
    outputs: list[_Output] | None = None


@dataclass
class InferRequest:
    """A validated inference request header; the input's data is still raw (JSON ``data`` or a byte count)."""

    id: str | None
    sequence_id: int | str
    stream_id: str
    sequence_start: bool
    sequence_end: bool
    shape: tuple[int, ...]
    data: Any = None  # JSON data (flat or nested) when not binary
    binary_size: int | None = None  # bytes of binary input data after the header
    outputs: list[tuple[str, bool]] = field(default_factory=list)  # (name, as binary), in response order


def header_length(value: str | None, body_size: int | None = None) -> int | None:
    """The ``Inference-Header-Content-Length`` header as an int (None when absent), or a 400."""
    if value is None:
        return None
    try:
        n = int(value.strip())
    except ValueError:
        raise V2Error(400, f"{HEADER_LENGTH} is not an integer: {value[:40]!r}") from None
    if n <= 0 or (body_size is not None and n > body_size):
        raise V2Error(400, f"{HEADER_LENGTH} {n} is not within the body's {body_size} bytes")
    return n


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "invalid inference request: " + "; ".join(parts[:5])


def _bool_param(params: Mapping[str, Any], name: str, where: str = "parameters") -> bool:
    v = params.get(name, False)
    if not isinstance(v, bool):
        raise V2Error(400, f"{where}.{name} must be true or false, got {json.dumps(v)[:40]}")
    return v


def sequence_stream(value: Any) -> tuple[int | str, str] | None:
    """``(sequence_id, stream_id)``, None for "no sequence" (missing, 0 or ""), or a 400 for a bad id."""
    if value is None or value == "" or (type(value) is int and value == 0):
        return None
    if type(value) is int:
        if not 0 < value <= MAX_SEQUENCE_ID:
            raise V2Error(400, f"parameters.sequence_id {value} is not an unsigned 64-bit integer")
        return value, str(value)
    if isinstance(value, str):
        if not valid_stream_id(value):
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise V2Error(400, f"parameters.sequence_id {shown!r} is invalid: use 1-128 characters of letters, "
                               "digits, '.', '_', '-' (or an unsigned integer)")
        return value, value
    raise V2Error(400, f"parameters.sequence_id must be an unsigned integer or a string, got {json.dumps(value)[:40]}")


def _check_parameters(params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - set(REQUEST_PARAMETERS))
    if unknown:
        raise V2Error(400, f"unknown request parameter(s) {', '.join(map(repr, unknown))}; this server takes "
                           f"{', '.join(REQUEST_PARAMETERS)}")
    for name in ("priority", "timeout"):
        v = params.get(name)
        if v is not None and (type(v) is not int or v < 0):
            raise V2Error(400, f"parameters.{name} must be a non-negative integer")


def _outputs(req: _Request, binary_default: bool) -> list[tuple[str, bool]]:
    if req.outputs is None:
        return [(name, binary_default) for name in OUTPUTS]
    out: list[tuple[str, bool]] = []
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise V2Error(400, f"unknown output {o.name!r}; the model's outputs are {', '.join(OUTPUTS)}")
        if any(name == o.name for name, _ in out):
            raise V2Error(400, f"output {o.name!r} is requested twice")
        params = o.parameters or {}
        extra = sorted(set(params) - OUTPUT_PARAMETERS)
        if extra:
            raise V2Error(400, f"output {o.name!r}: parameter(s) {', '.join(map(repr, extra))} not supported "
                               "(only binary_data; no shared memory, no classification extension)")
        binary = _bool_param(params, "binary_data", f"outputs[{o.name}].parameters") if "binary_data" in params \
            else binary_default
        out.append((o.name, binary))
    if not out:
        raise V2Error(400, "outputs is empty; leave it out to get every output")
    return out


def _the_input(req: _Request) -> _Input:
    names = [i.name for i in req.inputs]
    if len(req.inputs) != 1 or names[0] != INPUT.name:
        raise V2Error(400, f"the model takes exactly one input {INPUT.name!r} ({INPUT.datatype}, [N, H, W] or "
                           f"[N, H, W, C]); got input(s) {', '.join(map(repr, names))}")
    inp = req.inputs[0]
    if inp.datatype != INPUT.datatype:
        raise V2Error(400, f"input {INPUT.name!r} has datatype {inp.datatype!r}; it must be {INPUT.datatype}")
    if any(d < 0 for d in inp.shape):
        raise V2Error(400, f"input {INPUT.name!r}: shape {inp.shape} has a negative dimension")
    if len(inp.shape) not in (3, 4):
        raise V2Error(400, f"input {INPUT.name!r}: shape {inp.shape} must be [N, H, W] or [N, H, W, C]")
    return inp


def parse_header(raw: bytes, binary_size: int | None = None) -> InferRequest:
    """Validate the JSON inference request.

    Args:
        raw: the JSON inference request object.
        binary_size: bytes of binary data after it (0: none); None when not read yet (the caller checks later).
    """
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise V2Error(400, f"the inference request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise V2Error(400, "the inference request must be a JSON object")
    try:
        req = _Request.model_validate(doc)
    except ValidationError as exc:
        raise V2Error(400, _validation_message(exc)) from None
    params = req.parameters or {}
    _check_parameters(params)
    seq = sequence_stream(params.get("sequence_id"))
    start, end = _bool_param(params, "sequence_start"), _bool_param(params, "sequence_end")
    if seq is None:
        flag = " with sequence_start/sequence_end" if start or end else ""
        raise V2Error(400, f"parameters.sequence_id is missing{flag}: this model adapts one state per sequence; "
                           "send a non-zero uint64 or a non-empty string as sequence_id (0 and \"\" mean none)")
    inp = _the_input(req)
    binary, data = _input_payload(inp, binary_size)
    return InferRequest(
        id=req.id, sequence_id=seq[0], stream_id=seq[1], sequence_start=start, sequence_end=end,
        shape=tuple(inp.shape), data=data, binary_size=binary,
        outputs=_outputs(req, _bool_param(params, "binary_data_output")),
    )


def _input_payload(inp: _Input, binary_size: int | None) -> tuple[int | None, Any]:
    params = inp.parameters or {}
    extra = sorted(set(params) - INPUT_PARAMETERS)
    if extra:
        raise V2Error(400, f"input {inp.name!r}: parameter(s) {', '.join(map(repr, extra))} not supported "
                           "(only binary_data_size; no shared memory)")
    size = params.get("binary_data_size")
    expected = math.prod(inp.shape)  # UINT8: one byte per element
    if size is None:
        if binary_size:
            raise V2Error(400, f"{binary_size} bytes follow the JSON header but no input declares binary_data_size")
        if inp.data is None:
            raise V2Error(400, f"input {inp.name!r} has neither data nor parameters.binary_data_size")
        return None, inp.data
    if type(size) is not int or size < 0:
        raise V2Error(400, f"input {inp.name!r}: binary_data_size must be a non-negative integer")
    if inp.data is not None:
        raise V2Error(400, f"input {inp.name!r} has both data and binary_data_size")
    if binary_size is not None and size != binary_size:
        raise V2Error(400, f"input {inp.name!r} declares binary_data_size {size} but {binary_size} bytes follow "
                           "the JSON header")
    if size != expected:
        raise V2Error(400, f"input {inp.name!r}: binary_data_size {size} does not match shape {list(inp.shape)} "
                           f"({expected} UINT8 values)")
    return size, None


# ------------------------------------------------------------------------------------------- tensors


def _json_array(data: Any, shape: Sequence[int]) -> np.ndarray:
    """JSON tensor data (row-major, flat or nested as ``shape``) -> uint8 array of ``shape``, or a 400."""
    expected = math.prod(shape)
    try:
        arr = np.asarray(data)
    except (ValueError, OverflowError, TypeError) as exc:
        raise V2Error(400, f"input {INPUT.name!r}: data is not a regular array of integers ({exc})") from None
    if arr.size == 0 and expected == 0:
        return np.zeros(shape, dtype=np.uint8)
    if arr.dtype.kind not in "iu":
        what = {"b": "booleans", "f": "numbers with fractions", "U": "strings", "O": "mixed or ragged values"}
        raise V2Error(400, f"input {INPUT.name!r}: data must be integers 0..255 (UINT8), got "
                           f"{what.get(arr.dtype.kind, str(arr.dtype))}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 255):
        raise V2Error(400, f"input {INPUT.name!r}: data values must lie in 0..255 (UINT8), got "
                           f"{int(arr.min())}..{int(arr.max())}")
    if not ((arr.ndim == 1 and arr.size == expected) or arr.shape == tuple(shape)):
        raise V2Error(400, f"input {INPUT.name!r}: data of shape {list(arr.shape)} ({arr.size} values) does not fit "
                           f"shape {list(shape)} ({expected} values); send it flat or nested as the shape")
    return arr.astype(np.uint8).reshape(shape)


def npy_header(shape: Sequence[int]) -> bytes:
    """The ``.npy`` header of a C-ordered uint8 array of ``shape``."""
    buf = io.BytesIO()
    d = {"descr": "|u1", "fortran_order": False, "shape": tuple(int(s) for s in shape)}
    try:
        np.lib.format.write_array_header_1_0(buf, d)
    except ValueError:  # header over 64 KiB: version 2.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, d)
    return buf.getvalue()


def input_as_npy(req: InferRequest, binary: bytes | memoryview) -> bytes:
    """The request's input as ``.npy`` bytes (header + C-ordered uint8 data) for ``decode_npy``."""
    if req.binary_size is not None:
        return npy_header(req.shape) + bytes(binary)
    return npy_header(req.shape) + _json_array(req.data, req.shape).tobytes()


# ------------------------------------------------------------------------------------------- response


def encode_response(
    *, model_name: str, model_version: str, request_id: str | None, parameters: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray], outputs: Sequence[tuple[str, bool]],
) -> tuple[bytes, dict[str, str]]:
    """The inference response body and its extra headers (``Inference-Header-Content-Length`` when binary)."""
    described, blobs = [], []
    for name, binary in outputs:
        spec = OUTPUTS[name]
        arr = np.ascontiguousarray(tensors[name], dtype=np.dtype(spec.dtype))
        entry: dict[str, Any] = {"name": name, "datatype": spec.datatype, "shape": list(arr.shape)}
        if binary:
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        described.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["parameters"] = dict(parameters)
    doc["outputs"] = described
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *blobs]), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def tensor_metadata(spec: TensorSpec, num_classes: int) -> dict[str, Any]:
    shape = [num_classes if d == NUM_CLASSES_DIM else d for d in spec.shape]
    return {"name": spec.name, "datatype": spec.datatype, "shape": shape}


__all__ = [
    "HEADER_LENGTH", "INPUT", "OUTPUTS", "REQUEST_PARAMETERS", "InferRequest", "TensorSpec", "V2Error",
    "encode_response", "header_length", "input_as_npy", "npy_header", "parse_header", "sequence_stream",
    "tensor_metadata",
]
