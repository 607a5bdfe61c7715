"""Request bodies -> validated uint8 images. Pure functions, no HTTP framework, no model state.

Everything a request can get wrong is detected here, before the stream's state is touched:
``decode_body`` either returns a :class:`DecodedBatch` or raises :class:`DecodeError` whose
``code``/``status`` become the JSON error of the response.

Pixel budget. Image sizes are read from the headers first (PIL's lazy ``Image.open``; ICO files, which PIL
decodes while opening, are measured from their directory and embedded headers instead) and checked against
``max_image_pixels`` per image and ``max_request_pixels`` per request *before anything is decoded*. When a
:class:`PixelBudget` is given, the request's pixels are then reserved from it (the bound on decoded pixels held
by all requests in flight) and the decoded batch carries the reservation as ``batch.lease``: call
``batch.release()`` as soon as the images have been preprocessed (it drops the images and frees the budget).
Messages name the problem and the limit, never a path or an exception's text.
"""
from __future__ import annotations

import io
import struct
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

NPY_MEDIA_TYPES = frozenset({"application/x-npy", "application/npy"})
MULTIPART_MEDIA_TYPE = "multipart/form-data"
IMAGE_FIELD = "images"


__all__ = [
    "DecodeError", "DecodeLimits", "DecodedBatch", "PixelBudget", "PixelLease", "ProbedBody", "decode_body",
    "decode_image", "decode_multipart", "decode_npy", "media_type", "probe_body", "probe_image",
]


class DecodeError(ValueError):
    def __init__(self, code: str, message: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers or {}


@dataclass(frozen=True)
class DecodeLimits:
    max_images: int = 64
    max_image_pixels: int = 4096 * 4096
    max_request_pixels: int = 32 * 1024 * 1024  # all images of one request together, checked before decoding
    max_parts: int = 1000  # all multipart parts, files or fields


class PixelLease:
    """A reservation of decoded pixels from a :class:`PixelBudget`; ``release()`` is idempotent."""

    def __init__(self, budget: PixelBudget | None, pixels: int) -> None:
        self._budget = budget
        self.pixels = pixels

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget._give_back(self.pixels)


class PixelBudget:
    """Decoded pixels held by all requests in flight, at most ``max_pixels`` (thread-safe).

    ``acquire(n)`` either reserves ``n`` pixels and returns a :class:`PixelLease` or raises ``DecodeError``
    ``pixels_in_flight`` (503 + Retry-After: other requests hold the budget; the request may be retried as is).
    """

    def __init__(self, max_pixels: int, retry_after_seconds: int = 1) -> None:
        self.max_pixels = int(max_pixels)
        self.retry_after_seconds = int(retry_after_seconds)
        self._lock = threading.Lock()
        self._used = 0

    @property
    def used(self) -> int:
        return self._used

    def acquire(self, pixels: int) -> PixelLease:
        with self._lock:
            if self._used + pixels > self.max_pixels:
                raise DecodeError(
                    "pixels_in_flight",
                    f"the server is decoding {self._used} pixels for other requests; this request needs {pixels} "
                    f"more and the limit is {self.max_pixels} pixels in flight; retry shortly",
                    503, {"Retry-After": str(self.retry_after_seconds)},
                )
            self._used += pixels
        return PixelLease(self, pixels)

    def _give_back(self, pixels: int) -> None:
        with self._lock:
            self._used = max(0, self._used - pixels)


@dataclass
class DecodedBatch:
    """Either ``images`` (list of decoded PIL images, any sizes/modes) or ``array`` (uint8 N,H,W[,C])."""

    kind: str  # "multipart" | "npy"
    images: list[Image.Image] | None = None
    array: np.ndarray | None = None
    filenames: list[str] = field(default_factory=list)
    pixels: int = 0  # decoded pixels the batch holds
    lease: PixelLease | None = None  # its reservation in the in-flight pixel budget, if any

    def release(self) -> None:
        """Drop the decoded images and give their pixels back to the budget (call once preprocessed)."""
        self.images = None
        self.array = None
        if self.lease is not None:
            self.lease.release()

    def __len__(self) -> int:
        if self.array is not None:
            return int(self.array.shape[0])
        return len(self.images or [])

    @property
    def payload(self) -> Any:
        return self.array if self.array is not None else self.images


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(
    body: bytes, content_type: str | None, limits: DecodeLimits, budget: PixelBudget | None = None
) -> DecodedBatch:
    """Validate and decode a /predict body; pixels are checked (and reserved from ``budget``) before decoding."""
    return probe_body(body, content_type, limits, budget).decode()


@dataclass
class ProbedBody:
    """A body whose sizes are checked and whose ``pixels`` are reserved, not yet decoded: ``decode()`` does the
    pixel work (once). The caller can choose where by the size: a small batch on the event loop, a large one in a
    worker thread. An npy body is decoded when probed (its decoding is one copy of its bytes)."""

    pixels: int
    _batch: DecodedBatch | None = None
    _files: list[tuple[str, bytes]] | None = None
    _limits: DecodeLimits | None = None
    _lease: PixelLease | None = None

    def decode(self) -> DecodedBatch:
        if self._batch is not None:
            return self._batch
        assert self._files is not None and self._limits is not None, "decode() is called once"
        files, limits, self._files = self._files, self._limits, None
        try:
            images = [decode_image(data, fname, limits) for fname, data in files]
        except BaseException:
            if self._lease is not None:
                self._lease.release()
            raise
        return DecodedBatch(kind="multipart", images=images, filenames=[f for f, _ in files], pixels=self.pixels,
                            lease=self._lease)


def probe_body(
    body: bytes, content_type: str | None, limits: DecodeLimits, budget: PixelBudget | None = None
) -> ProbedBody:
    """Validate a /predict body and reserve its pixels from ``budget`` without decoding an image (multipart: the
    parts are parsed and every image's size read from its header; npy: decoded, a copy). Raises
    :class:`DecodeError` for anything wrong, with nothing reserved."""
    mt = media_type(content_type)
    if mt == MULTIPART_MEDIA_TYPE:
        return probe_multipart(body, content_type or "", limits, budget)
    if mt in NPY_MEDIA_TYPES:
        arr = decode_npy(body, limits)
        pixels = int(arr.shape[0] * arr.shape[1] * arr.shape[2])
        lease = budget.acquire(pixels) if budget is not None else None
        return ProbedBody(pixels, DecodedBatch(kind="npy", array=arr, pixels=pixels, lease=lease))
    raise DecodeError(
        "unsupported_media_type",
        f"Content-Type {mt or '(none)'!r} is not supported; send multipart/form-data with one or more "
        f"'{IMAGE_FIELD}' file fields, or an application/x-npy body (uint8 N x H x W [x C])",
        status=415,
    )


# --------------------------------------------------------------------------------------------- npy


# numpy parses a .npy header with ast.literal_eval. CPython 3.11's AST constructor keeps its recursion depth in
# interpreter-wide state, so two threads building ASTs at once (a garbage collection inside one lets the other run)
# can fail a valid header with "AST constructor recursion depth mismatch" (python/cpython#106905; seen here as a 400
# for a valid request when several requests were decoded in worker threads at once). Header parsing is ~20 us: one
# header at a time.
_NPY_HEADER_LOCK = threading.Lock()


def decode_npy(body: bytes, limits: DecodeLimits) -> np.ndarray:
    """Parse a .npy body without trusting its header: the shape is validated before any allocation."""
    if not body:
        raise DecodeError("empty_batch", "the request body is empty; expected a .npy array")
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
        with _NPY_HEADER_LOCK:
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:  # pragma: no cover - read_magic only returns known versions
                raise ValueError(f"unsupported .npy version {version}")
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError("invalid_npy", f"the body is not a valid .npy array: {exc}") from exc
    if not isinstance(shape, tuple) or any(type(d) is not int or d < 0 for d in shape):
        raise DecodeError(
            "invalid_npy_shape", f"array dimensions must be non-negative integers, got shape {shape!r}"
        )
    if dtype.hasobject:
        raise DecodeError("invalid_npy_dtype", "object arrays are not accepted; send dtype uint8")
    if dtype != np.dtype(np.uint8):
        raise DecodeError("invalid_npy_dtype", f"array dtype must be uint8, got {dtype}")
    if len(shape) not in (3, 4):
        raise DecodeError(
            "invalid_npy_shape", f"array must be N x H x W or N x H x W x C, got shape {tuple(shape)}"
        )
    if len(shape) == 4 and shape[3] not in (1, 3, 4):
        raise DecodeError("invalid_npy_shape", f"channel dimension must be 1, 3 or 4, got shape {tuple(shape)}")
    n, h, w = shape[0], shape[1], shape[2]
    if n == 0:
        raise DecodeError("empty_batch", "the array holds no images (N == 0)")
    if n > limits.max_images:
        raise DecodeError("too_many_images", f"{n} images in one request; the limit is {limits.max_images}", 413)
    if h == 0 or w == 0:
        raise DecodeError("invalid_npy_shape", f"images must have non-zero height and width, got shape {tuple(shape)}")
    if h * w > limits.max_image_pixels:
        raise DecodeError(
            "image_too_large", f"{h}x{w} = {h * w} pixels per image; the limit is {limits.max_image_pixels}", 413
        )
    _check_request_pixels(n * h * w, limits)
    expected = int(np.prod(shape))
    data = body[fp.tell():]
    if len(data) != expected:
        raise DecodeError(
            "invalid_npy", f"the header promises {expected} bytes of data for shape {tuple(shape)}, got {len(data)}"
        )
    arr = np.frombuffer(data, dtype=np.uint8).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(arr)  # copy: independent of the request buffer, writable


# --------------------------------------------------------------------------------------- multipart


@dataclass
class _Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)

    @property
    def disposition(self) -> tuple[str, dict[str, str]]:
        from python_multipart.multipart import parse_options_header

        kind, opts = parse_options_header(self.headers.get("content-disposition", ""))
        return kind.decode("latin-1").lower(), {
            k.decode("latin-1").lower(): v.decode("utf-8", "replace") for k, v in opts.items()
        }


def _parse_multipart(body: bytes, content_type: str, limits: DecodeLimits) -> list[_Part]:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise DecodeError("invalid_multipart", "multipart/form-data without a boundary parameter")
    if not body:
        raise DecodeError("empty_batch", f"the request body is empty; expected '{IMAGE_FIELD}' file fields")

    parts: list[_Part] = []
    cur: dict[str, Any] = {"part": None, "name": bytearray(), "value": bytearray()}

    def on_part_begin() -> None:
        if len(parts) >= limits.max_parts:
            raise DecodeError("too_many_parts", f"more than {limits.max_parts} multipart parts")
        cur["part"] = _Part()
        parts.append(cur["part"])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["value"] += data[start:end]

    def on_header_end() -> None:
        name = bytes(cur["name"]).decode("latin-1").strip().lower()
        cur["part"].headers[name] = bytes(cur["value"]).decode("latin-1").strip()
        cur["name"], cur["value"] = bytearray(), bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        cur["part"].data += data[start:end]

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except DecodeError:
        raise
    except (FormParserError, ValueError) as exc:
        raise DecodeError("invalid_multipart", f"malformed multipart body: {exc}") from exc
    if parser.state != MultipartState.END:
        raise DecodeError("invalid_multipart", "malformed multipart body: it ends before the closing boundary")
    return parts


def decode_multipart(
    body: bytes, content_type: str, limits: DecodeLimits, budget: PixelBudget | None = None
) -> DecodedBatch:
    return probe_multipart(body, content_type, limits, budget).decode()


def probe_multipart(
    body: bytes, content_type: str, limits: DecodeLimits, budget: PixelBudget | None = None
) -> ProbedBody:
    """The parts of a multipart body, each image's size read from its header, the pixels reserved (see
    :func:`probe_body`)."""
    parts = _parse_multipart(body, content_type, limits)
    files: list[tuple[str, bytes]] = []
    for i, part in enumerate(parts):
        kind, opts = part.disposition
        name = opts.get("name")
        if kind != "form-data" or name is None:
            raise DecodeError("invalid_multipart", f"part {i} has no Content-Disposition: form-data; name=...")
        if name != IMAGE_FIELD:
            raise DecodeError(
                "unexpected_field", f"unexpected form field {name!r}; send images as '{IMAGE_FIELD}' file fields"
            )
        files.append((opts.get("filename") or f"{IMAGE_FIELD}[{len(files)}]", bytes(part.data)))
    del parts
    if not files:
        raise DecodeError("empty_batch", f"no '{IMAGE_FIELD}' file fields in the request")
    if len(files) > limits.max_images:
        raise DecodeError(
            "too_many_images", f"{len(files)} images in one request; the limit is {limits.max_images}", 413
        )
    # headers only: every size is known and checked before the first pixel is decoded
    pixels = sum(probe_image(data, fname, limits) for fname, data in files)
    _check_request_pixels(pixels, limits)
    lease = budget.acquire(pixels) if budget is not None else None
    return ProbedBody(pixels, _files=files, _limits=limits, _lease=lease)


def _check_request_pixels(pixels: int, limits: DecodeLimits) -> None:
    if pixels > limits.max_request_pixels:
        raise DecodeError(
            "too_many_pixels",
            f"the images of this request hold {pixels} pixels together; the limit is {limits.max_request_pixels} "
            "pixels per request (send fewer or smaller images)",
            413,
        )


_ICO_MAGIC = b"\x00\x00\x01\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _ico_pixels(data: bytes) -> int:
    """Largest pixel count among an ICO's entries, from headers only (PIL decodes an ICO while opening it).

    An entry is a PNG (its IHDR size counts, whatever the directory claims) or a BMP/DIB (width x height/2:
    the DIB height covers the AND mask too).
    """
    if len(data) < 6:
        raise ValueError("truncated ICO header")
    count = struct.unpack_from("<H", data, 4)[0]
    if count == 0 or len(data) < 6 + 16 * count:
        raise ValueError("truncated ICO directory")
    largest = 0
    for i in range(count):
        entry = data[6 + 16 * i: 22 + 16 * i]
        w, h = entry[0] or 256, entry[1] or 256
        size, offset = struct.unpack_from("<II", entry, 8)
        head = data[offset: offset + 26]
        if head[:8] == _PNG_MAGIC and len(head) >= 24:
            w, h = struct.unpack_from(">II", head, 16)
        elif len(head) >= 12:
            dw, dh = struct.unpack_from("<ii", head, 4)
            w, h = max(w, abs(dw)), max(h, abs(dh) // 2)
        largest = max(largest, int(w) * int(h))
    return largest


def probe_image(data: bytes, name: str, limits: DecodeLimits) -> int:
    """Pixels of an image file from its headers (nothing is decoded); checks ``max_image_pixels``."""
    if not data:
        raise DecodeError("invalid_image", f"{name}: empty file")
    try:
        if data[:4] == _ICO_MAGIC:
            w, h = _ico_pixels(data), 1
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
                    w, h = img.size
    except UnidentifiedImageError as exc:
        raise DecodeError("invalid_image", f"{name}: not a recognised image format (or the file is cut short)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("image_too_large", f"{name}: the image is too large to decode safely", 413) from exc
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise DecodeError("invalid_image", f"{name}: cannot read the image header") from exc
    if w * h > limits.max_image_pixels:
        shown = f"{w}x{h} = {w * h}" if h != 1 else f"{w}"
        raise DecodeError(
            "image_too_large", f"{name}: {shown} pixels; the limit is {limits.max_image_pixels} per image", 413
        )
    return int(w * h)


def decode_image(data: bytes, name: str, limits: DecodeLimits) -> Image.Image:
    """Bytes of any PIL format -> fully decoded PIL image (first frame, original mode), or DecodeError.

    The size is checked from the headers (:func:`probe_image`) before decoding.
    """
    probe_image(data, name, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_image_pixels:  # a format whose header understated its size
                raise DecodeError(
                    "image_too_large",
                    f"{name}: {w}x{h} = {w * h} pixels; the limit is {limits.max_image_pixels}",
                    413,
                )
            img.load()  # full decode here: truncated files fail now, not inside the model
            # mode conversion (palette, alpha, 16-bit, CMYK ...) is the preprocessor's job
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError("invalid_image", f"{name}: not a recognised image format (or the file is cut short)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("image_too_large", f"{name}: the image is too large to decode safely", 413) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("invalid_image", f"{name}: cannot decode image ({exc})") from exc
    if img.width == 0 or img.height == 0:
        raise DecodeError("invalid_image", f"{name}: image has zero width or height")
    if img.width * img.height > limits.max_image_pixels:  # after load (ICO picks its largest entry)
        raise DecodeError("image_too_large", f"{name}: {img.width}x{img.height} pixels; the limit is "
                          f"{limits.max_image_pixels} per image", 413)
    return img
