"""service.decode: request bodies -> validated uint8 images, every rejection with its own code."""
from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import npy_bytes, png_bytes
from PIL import Image

from service.decode import DecodeError, DecodeLimits, decode_body, decode_image, decode_npy

LIMITS = DecodeLimits(max_images=4, max_image_pixels=64 * 64)


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "XbOuNdArY") -> tuple[bytes, str]:
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out.write(f"Content-Disposition: {disp}\r\n".encode())
        if filename:
            out.write(b"Content-Type: application/octet-stream\r\n")
        out.write(b"\r\n" + data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def noise(h: int, w: int, c: int | None = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def expect(code: str, status: int, fn, *args) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        fn(*args)
    assert info.value.code == code, info.value.message
    assert info.value.status == status
    assert info.value.message
    return info.value


def test_multipart_decodes_every_image_in_order_losslessly():
    imgs = [noise(10, 12, seed=i) for i in range(3)]
    body, ctype = multipart([("images", f"{i}.png", png_bytes(a)) for i, a in enumerate(imgs)])
    batch = decode_body(body, ctype, LIMITS)
    assert batch.kind == "multipart" and len(batch) == 3
    assert batch.filenames == ["0.png", "1.png", "2.png"]
    for got, want in zip(batch.images, imgs, strict=False):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_multipart_accepts_other_pil_formats():
    a = noise(16, 16, seed=3)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="BMP")
    gif = io.BytesIO()
    Image.fromarray(a[:, :, 0]).save(gif, format="GIF")
    body, ctype = multipart([("images", "a.bmp", buf.getvalue()), ("images", "b.gif", gif.getvalue())])
    batch = decode_body(body, ctype, LIMITS)
    np.testing.assert_array_equal(np.asarray(batch.images[0]), a)
    assert batch.images[1].size == (16, 16)


def test_npy_roundtrip_c_and_fortran_order():
    a = noise(5, 7, 3, seed=1)[None].repeat(2, axis=0)
    np.testing.assert_array_equal(decode_npy(npy_bytes(a), LIMITS), a)
    f = np.asfortranarray(noise(6, 5, None, seed=2)[None].repeat(3, axis=0))
    out = decode_body(npy_bytes(f), "application/x-npy", LIMITS).array
    np.testing.assert_array_equal(out, f)
    assert out.flags.c_contiguous and out.flags.writeable


@pytest.mark.parametrize(
    "data, code, status",
    [
        (b"\x89PNG\r\n\x1a\n not really", "invalid_image", 400),
        (b"hello, world", "invalid_image", 400),
        (b"", "invalid_image", 400),
    ],
)
def test_bad_image_bytes(data, code, status):
    expect(code, status, decode_image, data, "x", LIMITS)


def test_truncated_png_is_rejected_before_the_model():
    p = png_bytes(noise(48, 48, seed=5))
    err = expect("invalid_image", 400, decode_image, p[: len(p) // 2], "cut.png", LIMITS)
    assert "cut.png" in err.message


def test_image_over_pixel_limit():
    expect("image_too_large", 413, decode_image, png_bytes(noise(65, 64)), "big.png", LIMITS)


def test_multipart_rejections():
    png = png_bytes(noise(8, 8))
    body, ctype = multipart([("images", f"{i}.png", png) for i in range(5)])
    expect("too_many_images", 413, decode_body, body, ctype, LIMITS)
    body, ctype = multipart([])
    expect("empty_batch", 400, decode_body, body, ctype, LIMITS)
    body, ctype = multipart([("photo", "a.png", png)])
    err = expect("unexpected_field", 400, decode_body, body, ctype, LIMITS)
    assert "photo" in err.message
    body, ctype = multipart([("images", "a.png", png)])
    expect("invalid_multipart", 400, decode_body, body[:-20], ctype, LIMITS)
    expect("invalid_multipart", 400, decode_body, body, "multipart/form-data", LIMITS)
    body, ctype = multipart([("images", "a.png", png), ("images", "b.png", b"garbage")])
    err = expect("invalid_image", 400, decode_body, body, ctype, LIMITS)
    assert "b.png" in err.message


@pytest.mark.parametrize(
    "array, code, status",
    [
        (np.zeros((2, 8, 8, 3), np.float32), "invalid_npy_dtype", 400),
        (np.zeros((2, 8, 8), np.int64), "invalid_npy_dtype", 400),
        (np.zeros((8, 8), np.uint8), "invalid_npy_shape", 400),
        (np.zeros((1, 2, 8, 8, 3), np.uint8), "invalid_npy_shape", 400),
        (np.zeros((2, 8, 8, 2), np.uint8), "invalid_npy_shape", 400),
        (np.zeros((2, 0, 8), np.uint8), "invalid_npy_shape", 400),
        (np.zeros((0, 8, 8), np.uint8), "empty_batch", 400),
        (np.zeros((5, 8, 8), np.uint8), "too_many_images", 413),
        (np.zeros((1, 65, 64), np.uint8), "image_too_large", 413),
    ],
)
def test_npy_rejections(array, code, status):
    expect(code, status, decode_body, npy_bytes(array), "application/x-npy", LIMITS)


def test_npy_header_is_not_trusted():
    good = npy_bytes(np.zeros((1, 8, 8), np.uint8))
    expect("invalid_npy", 400, decode_npy, good[:-5], LIMITS)  # fewer data bytes than the header promises
    expect("invalid_npy", 400, decode_npy, good + b"xx", LIMITS)
    huge = good.replace(b"(1, 8, 8)", b"(1, 9999999, 9999999)")  # would allocate ~100 TB if trusted
    expect("image_too_large", 413, decode_npy, huge, LIMITS)
    expect("invalid_npy", 400, decode_npy, b"not an npy file at all", LIMITS)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    expect("invalid_npy_dtype", 400, decode_npy, obj.getvalue(), LIMITS)


def test_unsupported_media_type():
    expect("unsupported_media_type", 415, decode_body, b"{}", "application/json", LIMITS)
    expect("unsupported_media_type", 415, decode_body, b"abc", None, LIMITS)


def test_npy_headers_decode_in_parallel_threads():
    """CPython 3.11 keeps the AST constructor's recursion depth interpreter-wide, and numpy parses .npy headers with
    ast.literal_eval: two threads parsing at once, one of them paused by a garbage collection, failed a valid body
    with "AST constructor recursion depth mismatch" (a 400 in the service under concurrent requests). Here every
    collection pauses its thread so that the others run in the middle of it; without the header lock in decode_npy
    this test failed 4 runs of 4."""
    import gc
    import sys
    import threading
    import time

    a = np.zeros((4, 28, 28), np.uint8)
    body = npy_bytes(a)
    errors: list[str] = []

    def pause(phase: str, info: dict) -> None:
        if phase == "start":
            time.sleep(0.00005)

    def work() -> None:
        for _ in range(400):
            try:
                decode_npy(body, LIMITS)
            except DecodeError as exc:
                errors.append(exc.message)

    old_threshold, old_interval = gc.get_threshold(), sys.getswitchinterval()
    threads = [threading.Thread(target=work) for _ in range(4)]
    try:
        gc.set_threshold(1, 1, 1)
        sys.setswitchinterval(0.0001)
        gc.callbacks.append(pause)
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        if pause in gc.callbacks:
            gc.callbacks.remove(pause)
        gc.set_threshold(*old_threshold)
        sys.setswitchinterval(old_interval)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]
