"""The 19 corruptions with CIFAR-10-C's severity parameters (the small-image profile, ``profile="cifar-c"``).

Contract: ``CIFAR_C[name](x, severity, rng) -> float array in [0, 255]`` for an RGB uint8 image ``x`` (H, W, 3).
The functions are the ImageNet-C family (Hendrycks & Dietterich, ICLR 2019) with the constants of the authors'
``make_cifar_c.py`` table, which was tuned for 32x32 images; ImageNet-C's constants (``imagecorruptions``) are
for 224 px photos and erase most 32 px digits at severity 5. All randomness comes from the ``numpy.random.Generator``
passed in (never a global RNG), so a result depends only on (image, corruption, severity, rng seed).

Our own implementation, written from the published table: the reference script needs ImageMagick (``wand``) for
motion blur and snow and hard-codes 32 px; here motion blur is a 1-D Gaussian line kernel along a random angle
(the same approximation ``imagecorruptions`` uses for ImageMagick's motion blur) and the image size is read from
the input. The frost textures are the ones shipped with ``imagecorruptions`` (the reference's files), resized by
0.2 as in the reference. Why not the library: it has no parameter table other than ImageNet-C's.
"""
from __future__ import annotations

import importlib.resources
import math
from collections.abc import Callable
from io import BytesIO

import cv2
import numpy as np
import skimage as sk
from PIL import Image
from scipy.ndimage import map_coordinates
from scipy.ndimage import zoom as scizoom
from skimage.filters import gaussian

__all__ = ["CIFAR_C", "PARAMS", "corrupt_cifar"]

Rng = np.random.Generator

#: make_cifar_c.py's constants, severity 1..5 per corruption
PARAMS: dict[str, list] = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "speckle_noise": [.06, .1, .12, .16, .2],
    "gaussian_blur": [.4, .6, 0.7, .8, 1],
    "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
    "zoom_blur": [1.06, 1.11, 1.16, 1.21, 1.26],          # np.arange(1, z, 0.01)
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
    "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
    "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, 0), (0.65, 0.1, 0.8, 0.7, 0.5, 0), (0.65, 0.3, 1, 0.69, 0.5, 0),
                (0.65, 0.1, 0.7, 0.69, 0.6, 1), (0.65, 0.1, 0.5, 0.68, 0.6, 1)],
    "contrast": [.75, .5, .4, .3, 0.15],
    "brightness": [.05, .1, .15, .2, .3],
    "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    "jpeg_compression": [80, 65, 58, 50, 40],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "elastic_transform": [(0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)],
}


def _f(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64) / 255.0


def _out(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0, 1) * 255


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return gaussian(x, sigma=sigma, channel_axis=-1 if x.ndim == 3 else None)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
    size = 8 if radius <= 8 else int(math.ceil(radius))
    k = (3, 3) if radius <= 8 else (5, 5)
    grid = np.arange(-size, size + 1)
    xx, yy = np.meshgrid(grid, grid)
    d = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    return cv2.GaussianBlur(d / d.sum(), ksize=k, sigmaX=alias_blur)


def _clipped_zoom(img: np.ndarray, factor: float) -> np.ndarray:
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / factor)), int(np.ceil(w / factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoom = (factor, factor) + (1,) * (img.ndim - 2)
    out = scizoom(img[top:top + ch, left:left + cw], zoom, order=1)
    th, tw = (out.shape[0] - h) // 2, (out.shape[1] - w) // 2
    return out[th:th + h, tw:tw + w]


def _plasma(mapsize: int, decay: float, rng: Rng) -> np.ndarray:
    """Diamond-square height map in [0, 1] (side a power of two)."""
    a = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0
    while step >= 2:
        half = step // 2
        corners = a[0:mapsize:step, 0:mapsize:step]
        sq = corners + np.roll(corners, -1, axis=0)
        sq = sq + np.roll(sq, -1, axis=1)
        a[half:mapsize:step, half:mapsize:step] = sq / 4 + wibble * rng.uniform(-wibble, wibble, sq.shape)
        dr = a[half:mapsize:step, half:mapsize:step]
        ul = a[0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        a[0:mapsize:step, half:mapsize:step] = lt / 4 + wibble * rng.uniform(-wibble, wibble, lt.shape)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        a[half:mapsize:step, 0:mapsize:step] = tt / 4 + wibble * rng.uniform(-wibble, wibble, tt.shape)
        step //= 2
        wibble /= decay
    a -= a.min()
    return a / a.max()


def _shift(img: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Translate by (dx, dy) pixels, repeating the edge row/column into the uncovered border."""
    h, w = img.shape[:2]
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return img[ys][:, xs]


def _motion(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Line blur: a one-sided Gaussian kernel of width 2*radius+1 along ``angle`` degrees."""
    width = int(2 * radius + 1)
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    sy, sx = math.sin(math.radians(angle)), math.cos(math.radians(angle))
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(width):
        dy, dx = -math.ceil(i * sy - 0.5), -math.ceil(i * sx - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break
        out += k[i] * _shift(x, dx, dy)
    return out


def gaussian_noise(x, c, rng):
    x = _f(x)
    return _out(x + rng.normal(size=x.shape, scale=c))


def shot_noise(x, c, rng):
    return _out(rng.poisson(_f(x) * c) / c)


def impulse_noise(x, c, rng):
    x = _f(x).copy()
    flip = rng.random(x.shape) <= c
    salt = rng.random(x.shape) <= 0.5
    x[flip & salt], x[flip & ~salt] = 1.0, 0.0
    return _out(x)


def speckle_noise(x, c, rng):
    x = _f(x)
    return _out(x + x * rng.normal(size=x.shape, scale=c))


def gaussian_blur(x, c, rng):
    return _out(_blur(_f(x), c))


def glass_blur(x, c, rng):
    sigma, delta, iters = c
    x = np.uint8(_blur(_f(x), sigma) * 255)
    h, w = x.shape[:2]
    for _ in range(iters):
        for i in range(h - delta, delta, -1):
            for j in range(w - delta, delta, -1):
                dx, dy = rng.integers(-delta, delta, size=2)
                ip, jp = i + dy, j + dx
                x[i, j], x[ip, jp] = x[ip, jp].copy(), x[i, j].copy()
    return _out(_blur(x / 255.0, sigma))


def defocus_blur(x, c, rng):
    x, k = _f(x), _disk(c[0], c[1])
    return _out(np.stack([cv2.filter2D(x[:, :, d], -1, k) for d in range(3)], axis=2))


def motion_blur(x, c, rng):
    return np.clip(_motion(np.asarray(x, np.float64), c[0], c[1], rng.uniform(-45, 45)), 0, 255)


def zoom_blur(x, c, rng):
    x = _f(x)
    out = np.zeros_like(x)
    factors = np.arange(1, c, 0.01)
    for z in factors:
        out += _clipped_zoom(x, z)
    return _out((x + out) / (len(factors) + 1))


def fog(x, c, rng):
    x = _f(x)
    h, w = x.shape[:2]
    size = 1 << (max(h, w) - 1).bit_length()                      # the next power of two >= the image side
    max_val = x.max()
    x = x + c[0] * _plasma(size, c[1], rng)[:h, :w][..., None]
    return _out(x * max_val / (max_val + c[0]))


_FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")
_FROST_CACHE: dict[str, np.ndarray] = {}


def _frost_texture(name: str) -> np.ndarray:
    if name not in _FROST_CACHE:
        ref = importlib.resources.files("imagecorruptions") / "frost" / name
        with importlib.resources.as_file(ref) as path:
            img = cv2.imread(str(path))
        if img is None:
            raise FileNotFoundError(f"frost texture {name} missing from the imagecorruptions package")
        _FROST_CACHE[name] = cv2.resize(img, (0, 0), fx=0.2, fy=0.2)[..., ::-1]   # BGR -> RGB, scale as CIFAR-C
    return _FROST_CACHE[name]


def frost(x, c, rng):
    h, w = x.shape[:2]
    tex = _frost_texture(_FROST_FILES[int(rng.integers(len(_FROST_FILES)))])
    if tex.shape[0] <= h or tex.shape[1] <= w:
        s = 1.1 * max(h / tex.shape[0], w / tex.shape[1])
        tex = cv2.resize(np.ascontiguousarray(tex), (int(np.ceil(tex.shape[1] * s)), int(np.ceil(tex.shape[0] * s))))
    y0, x0 = int(rng.integers(0, tex.shape[0] - h)), int(rng.integers(0, tex.shape[1] - w))
    return np.clip(c[0] * np.asarray(x, np.float64) + c[1] * tex[y0:y0 + h, x0:x0 + w], 0, 255)


def snow(x, c, rng):
    x = np.asarray(x, np.float32) / 255.0
    layer = rng.normal(size=x.shape[:2], loc=c[0], scale=c[1])
    layer = _clipped_zoom(layer[..., None], c[2])
    layer[layer < c[3]] = 0
    layer = _motion(np.clip(layer[..., 0], 0, 1), c[4], c[5], rng.uniform(-135, -45))
    layer = (np.round(layer * 255) / 255.0)[..., None]
    gray = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)[..., None]
    x = c[6] * x + (1 - c[6]) * np.maximum(x, gray * 1.5 + 0.5)
    return _out(x + layer + np.rot90(layer, k=2))


def spatter(x, c, rng):
    x = np.asarray(x, np.float32) / 255.0
    liquid = _blur(rng.normal(size=x.shape[:2], loc=c[0], scale=c[1]), c[2])
    liquid[liquid < c[3]] = 0
    if c[5] == 0:
        liquid8 = (liquid * 255).astype(np.uint8)
        dist = cv2.distanceTransform(255 - cv2.Canny(liquid8, 50, 150), cv2.DIST_L2, 5)
        _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
        dist = cv2.equalizeHist(cv2.blur(dist, (3, 3)).astype(np.uint8))
        dist = cv2.filter2D(dist, cv2.CV_8U, np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]]))
        dist = cv2.blur(dist, (3, 3)).astype(np.float32)
        m = cv2.cvtColor((liquid8 * dist).astype(np.float32), cv2.COLOR_GRAY2BGR)
        m = m / max(float(m.max()), 1e-12) * c[4]
        water = np.array([175, 238, 238], np.float32) / 255.0      # pale turquoise (the reference's channel order)
        return _out(x + m * water)
    m = _blur(np.where(liquid > c[3], 1.0, 0.0), c[4])
    m[m < 0.8] = 0
    mud = np.array([63, 42, 20], np.float32) / 255.0               # mud brown (the reference's channel order)
    return _out(x * (1 - m[..., None]) + mud * m[..., None])


def contrast(x, c, rng):
    x = _f(x)
    means = x.mean(axis=(0, 1), keepdims=True)
    return _out((x - means) * c + means)


def brightness(x, c, rng):
    hsv = sk.color.rgb2hsv(_f(x))
    hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
    return _out(sk.color.hsv2rgb(hsv))


def saturate(x, c, rng):
    hsv = sk.color.rgb2hsv(_f(x))
    hsv[:, :, 1] = np.clip(hsv[:, :, 1] * c[0] + c[1], 0, 1)
    return _out(sk.color.hsv2rgb(hsv))


def jpeg_compression(x, c, rng):
    buf = BytesIO()
    Image.fromarray(np.asarray(x, np.uint8)).save(buf, "JPEG", quality=int(c))
    return np.asarray(Image.open(buf).convert("RGB"), np.float64)


def pixelate(x, c, rng):
    h, w = x.shape[:2]
    img = Image.fromarray(np.asarray(x, np.uint8)).resize((int(w * c), int(h * c)), Image.Resampling.BOX)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), np.float64)


def elastic_transform(x, c, rng):
    img = np.asarray(x, np.float32) / 255.0
    shape = img.shape
    size = min(shape[:2])
    alpha, sigma, affine = size * c[0], size * c[1], size * c[2]
    center = np.asarray(shape[:2], np.float32) // 2
    sq = min(shape[:2]) // 3
    pts1 = np.asarray([center + sq, [center[0] + sq, center[1] - sq], center - sq], np.float32)
    pts2 = pts1 + rng.uniform(-affine, affine, size=pts1.shape).astype(np.float32)
    img = np.asarray(cv2.warpAffine(img, cv2.getAffineTransform(pts1, pts2), shape[:2][::-1],
                                    borderMode=cv2.BORDER_REFLECT_101), np.float32)
    dx = gaussian(rng.uniform(-1, 1, size=shape[:2]), sigma, mode="reflect", truncate=3) * alpha
    dy = gaussian(rng.uniform(-1, 1, size=shape[:2]), sigma, mode="reflect", truncate=3) * alpha
    xx, yy, zz = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    idx = ((yy + dy[..., None]).reshape(-1, 1), (xx + dx[..., None]).reshape(-1, 1), zz.reshape(-1, 1))
    return _out(map_coordinates(img, idx, order=1, mode="reflect").reshape(shape))


CIFAR_C: dict[str, Callable[[np.ndarray, object, Rng], np.ndarray]] = {
    name: globals()[name] for name in PARAMS
}


def corrupt_cifar(x: np.ndarray, corruption: str, severity: int, seed: int) -> np.ndarray:
    """``x`` (H, W, 3) uint8 -> uint8 corrupted with CIFAR-10-C's constants, drawing from ``default_rng(seed)``."""
    out = CIFAR_C[corruption](x, PARAMS[corruption][int(severity) - 1], np.random.default_rng(seed))
    return np.clip(np.asarray(out), 0, 255).astype(np.uint8)
