"""Request bodies -> validated uint8 images. Pure functions, no HTTP framework, no model state.

Everything a request can get wrong is detected here, before the stream's state is touched:
``decode_body`` either returns a :class:`DecodedBatch` or raises :class:`DecodeError` whose
``code``/``status`` become the JSON error of the response.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

NPY_MEDIA_TYPES = frozenset({"application/x-npy", "application/npy"})
MULTIPART_MEDIA_TYPE = "multipart/form-data"
IMAGE_FIELD = "images"


class DecodeError(ValueError):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class DecodeLimits:
    max_images: int = 64
    max_image_pixels: int = 4096 * 4096
    max_parts: int = 1000  # all multipart parts, files or fields


@dataclass
class DecodedBatch:
    """Either ``images`` (list of decoded PIL images, any sizes/modes) or ``array`` (uint8 N,H,W[,C])."""

    kind: str  # "multipart" | "npy"
    images: list[Image.Image] | None = None
    array: np.ndarray | None = None
    filenames: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        if self.array is not None:
            return int(self.array.shape[0])
        return len(self.images or [])

    @property
    def payload(self) -> Any:
        return self.array if self.array is not None else self.images


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def decode_body(body: bytes, content_type: str | None, limits: DecodeLimits) -> DecodedBatch:
    mt = media_type(content_type)
    if mt == MULTIPART_MEDIA_TYPE:
        return decode_multipart(body, content_type or "", limits)
    if mt in NPY_MEDIA_TYPES:
        return DecodedBatch(kind="npy", array=decode_npy(body, limits))
    raise DecodeError(
        "unsupported_media_type",
        f"Content-Type {mt or '(none)'!r} is not supported; send multipart/form-data with one or more "
        f"'{IMAGE_FIELD}' file fields, or an application/x-npy body (uint8 N x H x W [x C])",
        status=415,
    )


# --------------------------------------------------------------------------------------------- npy


def decode_npy(body: bytes, limits: DecodeLimits) -> np.ndarray:
    """Parse a .npy body without trusting its header: the shape is validated before any allocation."""
    if not body:
        raise DecodeError("empty_batch", "the request body is empty; expected a .npy array")
    fp = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(fp)
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


def decode_multipart(body: bytes, content_type: str, limits: DecodeLimits) -> DecodedBatch:
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
    if not files:
        raise DecodeError("empty_batch", f"no '{IMAGE_FIELD}' file fields in the request")
    if len(files) > limits.max_images:
        raise DecodeError(
            "too_many_images", f"{len(files)} images in one request; the limit is {limits.max_images}", 413
        )
    images = [decode_image(data, fname, limits) for fname, data in files]
    return DecodedBatch(kind="multipart", images=images, filenames=[f for f, _ in files])


def decode_image(data: bytes, name: str, limits: DecodeLimits) -> Image.Image:
    """Bytes of any PIL format -> fully decoded PIL image (first frame, original mode), or DecodeError."""
    if not data:
        raise DecodeError("invalid_image", f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_image_pixels:
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
        raise DecodeError("image_too_large", f"{name}: {exc}", 413) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError("invalid_image", f"{name}: cannot decode image ({exc})") from exc
    if img.width == 0 or img.height == 0:
        raise DecodeError("invalid_image", f"{name}: image has zero width or height")
    return img
