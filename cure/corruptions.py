"""The 15 common corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), for evaluation images.

    from cure.corruptions import CORRUPTIONS, corrupt
    x_c = corrupt(x, "fog", severity=3, seed=0)       # x: (N, C, H, W) in [0, 1] (or uint8), C = 1 or 3

Each corruption follows the published CIFAR-10-C definition (the paper's Appendix and its released
generator for 32x32 images), with the CIFAR-10-C parameters for severities 1 to 5 (:data:`PARAMETERS`),
re-implemented here with numpy, scipy.ndimage and Pillow:

* noise: ``gaussian_noise`` (x + N(0, c^2)), ``shot_noise`` (Poisson(c x) / c), ``impulse_noise``
  (salt-and-pepper: each value is replaced with probability c, by 0 or 1 with equal odds);
* blur: ``defocus_blur`` (a disk of radius r, anti-aliased by a 3x3 Gaussian, as the filter),
  ``glass_blur`` (Gaussian blur, 8-bit quantisation, each pixel replaced by a random neighbour at an offset
  in {-1, 0}^2 as the released generator does, Gaussian blur again),
  ``motion_blur`` (ImageMagick's motion-blur kernel: a one-sided Gaussian-weighted line of 2 ceil(r) + 1
  taps in a random direction in [-45, 45] degrees, edge pixels repeated), ``zoom_blur`` (the mean of the
  image and its centre zooms by each factor of ``np.arange(1, z_max, 0.01)``, bilinear);
* weather: ``snow`` (a thresholded, zoomed and motion-blurred Gaussian layer added twice, the second
  rotated by 180 degrees, over a brightened image), ``frost`` (see below), ``fog`` (a diamond-square
  plasma fractal added, then rescaled), ``brightness`` (+c on the HSV value channel);
* digital: ``contrast`` ((x - mean) c + mean per channel), ``elastic_transform`` (a random affine warp of
  three points, then a Gaussian-smoothed random displacement field, bilinear), ``pixelate`` (box
  down-sampling to c times the size and box up-sampling back), ``jpeg_compression`` (JPEG at quality c).

Deviations, all deliberate and documented:

* ``frost``: the original blends the image with a random crop of one of five photographs of frost
  (``c0 x + c1 frost``), which are not part of this project. Here the photographs are replaced by five
  procedural 128x128 frost textures (:func:`frost_texture`, generated once from fixed seeds: a fine plasma
  fractal for the frozen haze plus bright ice needles, i.e. sparse seeds smeared by motion-blur kernels in
  random directions; values in [0, 1], tinted pale blue on RGB images); each image takes a random crop of
  a random one. The blend and the per-severity weights c0, c1 are the published ones, so the severity
  trend is the original's, but the accuracies are not comparable number for number with CIFAR-10-C's
  frost.
* Images stay float in [0, 1]; they are not rounded to 8 bits at the end (CIFAR-10-C stores uint8), except
  where the corruption itself quantises (JPEG; glass blur's intermediate step; the snow layer).
* Sizes scale with the image: the elastic transform's parameters are multiples of the image size (32 in
  CIFAR-10-C, 28 for Fashion-MNIST), the plasma fractal is generated on the next power of two and cropped.
* Grayscale images (C = 1) use the same definitions on their single channel; where the original converts
  to gray (snow) or to HSV (brightness), the gray image is its own luminance and value channel.

Randomness: image ``i`` of a call draws from its own generator, seeded with (seed, corruption, severity,
``start_index + i``), so a corrupted image does not depend on how the images are batched.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor

__all__ = ["CORRUPTIONS", "SEVERITIES", "PARAMETERS", "corrupt", "frost_texture", "plasma_fractal"]

CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
)
SEVERITIES = (1, 2, 3, 4, 5)

#: CIFAR-10-C's parameters, severity 1 first. Tuples name their fields in the comments.
PARAMETERS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # standard deviation
    "shot_noise": (500, 250, 100, 75, 50),  # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),  # fraction of values replaced
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # disk radius, alias sigma
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),  # sigma, delta, iters
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),  # radius, sigma
    "zoom_blur": (1.06, 1.11, 1.16, 1.21, 1.26),  # zoom factors np.arange(1, this, 0.01)
    # snow: mean, std, zoom, threshold, blur radius, blur sigma, weight of the image
    "snow": (
        (0.1, 0.2, 1, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
    ),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),  # weight of image, of frost
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # amount, fractal wibble decay
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),  # contrast factor
    # elastic: displacement scale alpha, its smoothing sigma, affine jitter; multiples of the image size
    "elastic_transform": ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),  # down-sampling factor
    "jpeg_compression": (80, 65, 58, 50, 40),  # JPEG quality
}

_LUMA = np.array([0.299, 0.587, 0.114])  # RGB -> gray weights (ITU-R BT.601)


# ------------------------------------------------------------------------------------------------
# Helpers (arrays are float64 (N, C, H, W) or (H, W) in [0, 1] unless stated)
def _gauss_hw(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian filter over the last two axes only."""
    if sigma <= 0:
        return x.copy()
    sig = (0.0,) * (x.ndim - 2) + (sigma, sigma)
    return ndimage.gaussian_filter(x, sigma=sig, mode=mode, truncate=truncate)


def _clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """Zoom the centre of ``x`` (last two axes) by ``factor`` >= 1 (bilinear) and crop back to its size."""
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / factor), math.ceil(w / factor)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    # scipy.ndimage.zoom(crop, factor, order=1): output size round(size * factor), corners aligned; the same
    # as bilinear interpolation with aligned corners, which torch does much faster on a batch.
    size = (int(round(ch * factor)), int(round(cw * factor)))
    t = torch.from_numpy(np.ascontiguousarray(crop)).reshape(-1, 1, ch, cw)
    zoomed = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=True)
    zoomed = zoomed.reshape(*x.shape[:-2], *size).numpy()
    th, tw = (zoomed.shape[-2] - h) // 2, (zoomed.shape[-1] - w) // 2
    return zoomed[..., th : th + h, tw : tw + w]


def _motion_blur(img: np.ndarray, radius: float, sigma: float, angle_deg: float) -> np.ndarray:
    """ImageMagick's motion blur of ``img`` (..., H, W): width 2 ceil(radius) + 1 taps with weights
    exp(-i^2 / (2 sigma^2)) (normalised) at offsets round(i (cos a, sin a)), i = 0 .. width - 1, taken
    from the image with its edge pixels repeated."""
    width = 2 * math.ceil(radius) + 1
    i = np.arange(width, dtype=np.float64)
    weights = np.exp(-(i**2) / (2.0 * sigma**2))
    weights /= weights.sum()
    a = math.radians(angle_deg)
    off_x = np.ceil(i * math.cos(a) - 0.5).astype(np.int64)  # column offsets
    off_y = np.ceil(i * math.sin(a) - 0.5).astype(np.int64)  # row offsets
    h, w = img.shape[-2:]
    pad = width
    padded = np.pad(img, [(0, 0)] * (img.ndim - 2) + [(pad, pad), (pad, pad)], mode="edge")
    out = np.zeros_like(img)
    for wt, oy, ox in zip(weights, off_y, off_x):
        out += wt * padded[..., pad + oy : pad + oy + h, pad + ox : pad + ox + w]
    return out


def plasma_fractal(size: int, wibble_decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) diamond-square height map in [0, 1] (``size`` a power of two), toroidal.

    Each level sets the new points to the mean of their four neighbours plus a uniform displacement in
    [-w^2, w^2]; w starts at 100 and is divided by ``wibble_decay`` after each level (the published
    generator's schedule, which fog's severities are tuned to).
    """
    if size < 2 or size & (size - 1):
        raise ValueError(f"plasma_fractal: size must be a power of two >= 2, got {size}")
    m = np.zeros((size, size), dtype=np.float64)
    step, wibble = size, 100.0

    def displaced(total: np.ndarray) -> np.ndarray:
        return total / 4.0 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = m[0:size:step, 0:size:step]
        total = corners + np.roll(corners, -1, axis=0)
        total = total + np.roll(total, -1, axis=1)
        m[half:size:step, half:size:step] = displaced(total)
        corners = m[0:size:step, 0:size:step]
        centres = m[half:size:step, half:size:step]
        top = corners + np.roll(corners, -1, axis=1) + centres + np.roll(centres, 1, axis=0)
        m[0:size:step, half:size:step] = displaced(top)
        left = corners + np.roll(corners, -1, axis=0) + centres + np.roll(centres, 1, axis=1)
        m[half:size:step, 0:size:step] = displaced(left)
        step = half
        wibble /= wibble_decay
    m -= m.min()
    peak = m.max()
    return m / peak if peak > 0 else m


def frost_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural frost (replaces CIFAR-10-C's frost photographs, which this project does not have).

    A (height, width) texture in [0, 1]: 0.55 x a fine plasma fractal (haze) plus bright ice needles, made
    of sparse seeds (3 % of the pixels, random brightness) smeared along random directions by motion-blur
    kernels of radius 2 to 5, normalised to peak 1 and clipped.
    """
    size = 1 << max(1, math.ceil(math.log2(max(height, width))))
    haze = plasma_fractal(size, 1.4, rng)[:height, :width]
    needles = np.zeros((height, width))
    for _ in range(3):
        seeds = (rng.random((height, width)) < 0.01) * rng.uniform(0.5, 1.0, (height, width))
        streak = _motion_blur(seeds, radius=float(rng.integers(2, 6)), sigma=3.0, angle_deg=rng.uniform(0, 360))
        needles = np.maximum(needles, streak)
    if needles.max() > 0:
        needles /= needles.max()
    return np.clip(0.55 * haze + 0.8 * needles, 0.0, 1.0)


def _rgb_to_gray(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, 1, H, W) luminance; a gray image is its own luminance."""
    if x.shape[1] == 1:
        return x.copy()
    return np.tensordot(x, _LUMA, axes=([1], [0]))[:, None]


def _draw(rngs: list[np.random.Generator], fn: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
    """Stack one draw per image: ``fn(rng_i)`` for each image's generator."""
    return np.stack([np.asarray(fn(r)) for r in rngs])


# ------------------------------------------------------------------------------------------------
# The corruptions: f(x (N, C, H, W) float64 in [0, 1], parameter, rngs) -> same shape (clipped later)
def _gaussian_noise(x, c, rngs):
    return x + _draw(rngs, lambda r: r.normal(0.0, c, x.shape[1:]))


def _shot_noise(x, c, rngs):
    return np.stack([r.poisson(xi * c) for r, xi in zip(rngs, x)]).astype(np.float64) / c


def _impulse_noise(x, c, rngs):
    flip = _draw(rngs, lambda r: r.random(x.shape[1:]))
    salt = _draw(rngs, lambda r: r.random(x.shape[1:]))
    out = x.copy()
    out[(flip < c) & (salt < 0.5)] = 1.0
    out[(flip < c) & (salt >= 0.5)] = 0.0
    return out


def _gauss_1d(sigma: float, taps: int = 3) -> np.ndarray:
    k = np.arange(taps, dtype=np.float64) - (taps - 1) / 2
    g = np.exp(-(k**2) / (2.0 * sigma**2))
    return g / g.sum()


def _disk_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """A disk of ``radius`` (normalised), anti-aliased by a 3x3 Gaussian of ``alias_sigma``; cropped to
    its non-zero support (the disk is never wider than the 17x17 grid of the definition)."""
    half = 8 if radius <= 8 else math.ceil(radius)
    taps = 3 if radius <= 8 else 5
    ax = np.arange(-half, half + 1, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    disk = (xx**2 + yy**2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = _gauss_1d(alias_sigma, taps)
    kernel = ndimage.correlate1d(disk, g, axis=0, mode="mirror")
    kernel = ndimage.correlate1d(kernel, g, axis=1, mode="mirror")
    rows = np.flatnonzero(np.abs(kernel).sum(axis=1) > 0)
    extent = int(max(half - rows[0], rows[-1] - half))
    return kernel[half - extent : half + extent + 1, half - extent : half + extent + 1]


def _defocus_blur(x, c, rngs):
    kernel = _disk_kernel(*c)
    return ndimage.correlate(x, kernel[None, None], mode="mirror")


def _glass_blur(x, c, rngs):
    """Blur, quantise to 8 bits, move pixels locally, blur again.

    The released generator scans (h, w) from the bottom-right to the top-left, h and w from size - delta down
    to delta + 1, and "swaps" pixel (h, w) with (h + dy, w + dx), dx and dy uniform integers in
    [-delta, delta - 1], by a tuple assignment of numpy views; for RGB images that copies (h + dy, w + dx)
    into (h, w) and leaves the source as it was. With delta = 1 (every CIFAR-10-C severity) each source lies
    at an offset in {-1, 0}^2, i.e. at a position the scan has not reached yet, so one pass is exactly the
    gather out[h, w] = in[h + dy, w + dx]; the CIFAR-10-C images follow that, and so does this function
    (for grayscale images too)."""
    sigma, delta, iterations = c
    if delta != 1:
        raise ValueError(f"glass blur is defined here for delta = 1 (CIFAR-10-C's value), got {delta}")
    n, _, h, w = x.shape
    out = np.floor(np.clip(_gauss_hw(x, sigma), 0, 1) * 255.0) / 255.0  # the definition's 8-bit step
    rows = np.arange(h - delta, delta, -1)  # the scan order of the definition (for the random draws)
    cols = np.arange(w - delta, delta, -1)
    shifts = _draw(rngs, lambda r: r.integers(-delta, delta, (iterations, len(rows), len(cols), 2)))
    idx = np.arange(n)[:, None, None]
    rr, cc = rows[None, :, None], cols[None, None, :]
    for it in range(iterations):
        dx, dy = shifts[:, it, :, :, 0], shifts[:, it, :, :, 1]
        src = out[idx, :, rr + dy, cc + dx]  # (n, rows, cols, C)
        out[idx, :, rr, cc] = src
    return _gauss_hw(out, sigma)


def _motion_blur_images(x, c, rngs):
    radius, sigma = c
    return np.stack([_motion_blur(xi, radius, sigma, r.uniform(-45, 45)) for r, xi in zip(rngs, x)])


def _zoom_blur(x, c, rngs):
    factors = np.arange(1, c, 0.01)
    out = x.copy()
    for z in factors:
        out += _clipped_zoom(x, float(z))
    return out / (len(factors) + 1)


def _snow(x, c, rngs):
    mean, std, zoom, threshold, radius, sigma, keep = c
    n, _, h, w = x.shape
    layers = []
    for r in rngs:
        layer = _clipped_zoom(r.normal(mean, std, (h, w)), zoom)
        layer[layer < threshold] = 0.0
        layer = np.floor(np.clip(layer, 0, 1) * 255.0) / 255.0
        layers.append(_motion_blur(layer, radius, sigma, r.uniform(-135, -45)))
    snow = np.stack(layers)[:, None]
    bright = np.maximum(x, _rgb_to_gray(x) * 1.5 + 0.5)
    out = keep * x + (1.0 - keep) * bright
    return out + snow + np.rot90(snow, k=2, axes=(2, 3))


#: Side of the procedural frost "photographs" that frost crops its overlays from.
FROST_TEXTURE_SIZE = 128
_FROST_BANK: list[np.ndarray] = []


def _frost_bank() -> list[np.ndarray]:
    """The five frost textures (fixed seeds, made once per process)."""
    if not _FROST_BANK:
        size = FROST_TEXTURE_SIZE
        _FROST_BANK.extend(frost_texture(size, size, np.random.default_rng([0xF057, k])) for k in range(5))
    return _FROST_BANK


def _frost_crop(bank: list[np.ndarray], h: int, w: int, r: np.random.Generator) -> np.ndarray:
    texture = bank[int(r.integers(len(bank)))]
    top = int(r.integers(0, texture.shape[0] - h + 1))
    left = int(r.integers(0, texture.shape[1] - w + 1))
    return texture[top : top + h, left : left + w]


def _frost(x, c, rngs):
    n, ch, h, w = x.shape
    if h > FROST_TEXTURE_SIZE or w > FROST_TEXTURE_SIZE:
        raise ValueError(f"frost supports images up to {FROST_TEXTURE_SIZE} pixels a side, got {h}x{w}")
    bank = _frost_bank()
    texture = _draw(rngs, lambda r: _frost_crop(bank, h, w, r))[:, None]
    if ch == 3:
        texture = texture * np.array([0.88, 0.94, 1.0])[None, :, None, None]
    return c[0] * x + c[1] * texture


def _fog(x, c, rngs):
    amount, decay = c
    n, _, h, w = x.shape
    size = 1 << max(1, math.ceil(math.log2(max(h, w))))
    fractal = _draw(rngs, lambda r: plasma_fractal(size, decay, r)[:h, :w])[:, None]
    peak = x.reshape(n, -1).max(axis=1)[:, None, None, None]
    return (x + amount * fractal) * peak / (peak + amount)


def _brightness(x, c, rngs):
    value = x.max(axis=1, keepdims=True)  # HSV value; the hue and saturation are kept
    new = np.clip(value + c, 0, 1)
    safe = np.where(value > 0, value, 1.0)
    return np.where(value > 0, x * (new / safe), new)


def _contrast(x, c, rngs):
    means = x.mean(axis=(2, 3), keepdims=True)
    return (x - means) * c + means


def _elastic_transform(x, c, rngs):
    n, ch, h, w = x.shape
    size = float(h)
    alpha, sigma, jitter = (v * size for v in c)
    centre = np.array([w // 2, h // 2], dtype=np.float64)  # (x, y)
    sq = min(h, w) // 3
    src = np.array([centre + sq, [centre[0] + sq, centre[1] - sq], centre - sq])  # three (x, y) points
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    out = np.empty_like(x)
    for i, r in enumerate(rngs):
        dst = src + r.uniform(-jitter, jitter, src.shape)
        # The affine map A p + t taking src to dst; output pixel p samples the input at A^-1 (p - t).
        A_t = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst)  # rows: A^T, then t
        A, t = A_t[:2].T, A_t[2]
        inv = np.linalg.inv(A)
        px = inv[0, 0] * (cols - t[0]) + inv[0, 1] * (rows - t[1])
        py = inv[1, 0] * (cols - t[0]) + inv[1, 1] * (rows - t[1])
        warped = np.stack([ndimage.map_coordinates(xi, [py, px], order=1, mode="mirror") for xi in x[i]])
        dx = _gauss_hw(r.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3.0) * alpha
        dy = _gauss_hw(r.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3.0) * alpha
        out[i] = np.stack(
            [ndimage.map_coordinates(wi, [rows + dy, cols + dx], order=1, mode="reflect") for wi in warped]
        )
    return out


def _pixelate(x, c, rngs):
    n, ch, h, w = x.shape
    small = (max(1, int(w * c)), max(1, int(h * c)))
    out = np.empty_like(x)
    for i in range(n):
        for k in range(ch):
            img = Image.fromarray(x[i, k].astype(np.float32), mode="F")
            out[i, k] = np.asarray(img.resize(small, Image.BOX).resize((w, h), Image.BOX), dtype=np.float64)
    return out


def _jpeg_compression(x, c, rngs):
    n, ch, h, w = x.shape
    q = np.rint(np.clip(x, 0, 1) * 255.0).astype(np.uint8)
    out = np.empty_like(x)
    for i in range(n):
        img = Image.fromarray(q[i, 0], mode="L") if ch == 1 else Image.fromarray(q[i].transpose(1, 2, 0), "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(c))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if ch == 1 else "RGB"), dtype=np.float64) / 255.0
        out[i] = dec[None] if ch == 1 else dec.transpose(2, 0, 1)
    return out


_FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "defocus_blur": _defocus_blur,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur_images,
    "zoom_blur": _zoom_blur,
    "snow": _snow,
    "frost": _frost,
    "fog": _fog,
    "brightness": _brightness,
    "contrast": _contrast,
    "elastic_transform": _elastic_transform,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
}


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0, start_index: int = 0) -> Tensor:
    """``images`` with corruption ``name`` at ``severity`` (1 to 5).

    Args:
        images: (N, C, H, W) with C = 1 (grayscale) or 3 (RGB); float in [0, 1] or uint8 (divided by 255).
            Any device; the work is done on the CPU.
        name: one of :data:`CORRUPTIONS`.
        severity: 1 (mildest) to 5, CIFAR-10-C's levels.
        seed: the base seed (a non-negative integer).
        start_index: the index of ``images[0]`` in the whole evaluation set; image i draws from a generator
            seeded with (seed, corruption, severity, start_index + i), so results do not depend on batching.

    Returns:
        float32 tensor of the same shape on the same device, values in [0, 1].
    """
    if name not in _FUNCTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
    for label, value in (("seed", seed), ("start_index", start_index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{label} must be a non-negative integer, got {value!r}")
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, C, H, W) tensor with C = 1 or 3, got {shape}")
    if images.shape[2] < 8 or images.shape[3] < 8:
        raise ValueError(f"images must be at least 8x8 pixels, got {tuple(images.shape[2:])}")
    device = images.device
    if images.dtype == torch.uint8:
        x = images.detach().cpu().numpy().astype(np.float64) / 255.0
    elif images.is_floating_point():
        x = images.detach().cpu().double().numpy()
        if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
            raise ValueError("float images must be finite and lie in [0, 1]")
    else:
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    n = x.shape[0]
    if n == 0:
        return torch.empty(images.shape, dtype=torch.float32, device=device)
    kind = CORRUPTIONS.index(name)
    rngs = [np.random.default_rng([seed, kind, severity, start_index + i]) for i in range(n)]
    out = _FUNCTIONS[name](x, PARAMETERS[name][severity - 1], rngs)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(out)).to(device)
