"""Photometric ops on small PIL crops: the reference's colour jitter, grayscale, blur and solarize, cheaper.

The reference applies ``ColorJitter`` through ``ImageEnhance`` (each factor builds a second image
and blends it), hue through two HSV conversions, and blur as a 9 × 9 float convolution with two
tensor round trips.  Here:

- brightness and contrast are per-channel maps ``floor(m + f (x - m))`` clipped to [0, 255] —
  exactly PIL's blend arithmetic (float32) — so any run of them composes into one 256-entry
  lookup table applied in a single ``Image.point`` pass; contrast's mean grey comes from the
  channel histograms pushed through the pending table (no extra image);
- saturation is one 3 × 4 colour-matrix pass (blend with the luma image, PIL's own weights);
- hue is one cached 3-D LUT pass, quantised to 1/256 turn like PIL's 8-bit HSV path;
- the blur is PIL's Gaussian with the *same variance* as the reference's 9-tap kernel at that
  sigma (the truncation at ±4 px makes it narrower than sigma for sigma > ~1);
- solarize is a lookup table.
The random draws are untouched: these functions take the already-drawn parameters.
"""
from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageFilter

BLUR_TAPS = 9  # the reference's GaussianBlur kernel size
_LUMA = (0.299, 0.587, 0.114)  # PIL's "L" weights (ITU-R 601-2), used by ImageEnhance and grayscale
_IDENTITY = np.arange(256, dtype=np.float32)


def blend_lut(factor: float, degenerate: float) -> np.ndarray:
    """``Image.blend(degenerate, image, factor)`` per value: float32 maths, clip, truncate."""
    f = np.float32(factor)
    d = np.float32(degenerate)
    out = d + f * (_IDENTITY - d)
    return np.clip(out, 0.0, 255.0).astype(np.uint8)


def _point(img: Image.Image, table: list[int]) -> Image.Image:
    """``Image.point`` without its per-call Python rounding loop over the table (which costs more
    than the C pass on a 98 px crop); the public call where the core method is missing."""
    core = getattr(img.im, "point", None)
    if core is None:
        return img.point(table)
    return img._new(core(table, None))


def _apply(img: Image.Image, lut: np.ndarray | None) -> Image.Image:
    if lut is None:
        return img
    return _point(img, lut.tolist() * len(img.getbands()))


def _mean_grey(img: Image.Image, lut: np.ndarray | None) -> int:
    """ImageEnhance.Contrast's ``int(mean(L) + 0.5)`` of ``lut(img)`` from the channel histograms."""
    hist = np.array(img.histogram(), dtype=np.float32).reshape(-1, 256)
    values = _IDENTITY if lut is None else lut.astype(np.float32)
    n = float(img.width * img.height)
    if hist.shape[0] == 1:
        return int(hist[0] @ values / n + 0.5)
    means = hist @ values / n
    return int(float(np.dot(_LUMA, means)) + 0.5)


def saturate(img: Image.Image, factor: float) -> Image.Image:
    """ImageEnhance.Color in one colour-matrix pass: blend with the luma image by ``factor``."""
    if img.mode == "L":
        return img
    rows = []
    for c in range(3):
        row = [(1.0 - factor) * w for w in _LUMA]
        row[c] += factor
        rows += row + [-0.5]  # the matrix path rounds; the blend truncates
    return img.convert("RGB", tuple(rows))


def _rotate_hue(rgb: np.ndarray, turns: float) -> np.ndarray:
    """Exact HSV hue rotation of float RGB rows in [0, 1] (same formula as torchvision's tensor path)."""
    hi, lo = rgb.max(-1), rgb.min(-1)
    chroma = hi - lo
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe = np.where(chroma > 0, chroma, 1.0)
    h = np.where(hi == r, ((g - b) / safe) % 6.0, np.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    k = (h[..., None] + 6.0 * turns + np.array([5.0, 3.0, 1.0])) % 6.0
    return hi[..., None] - chroma[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


_HUE_LUT_SIZE = 17


@functools.lru_cache(maxsize=256)
def _hue_lut(shift: int) -> ImageFilter.Color3DLUT:
    """3-D colour lookup table (17^3 nodes, trilinear) for a hue rotation of ``shift``/256 turn."""
    grid = np.linspace(0.0, 1.0, _HUE_LUT_SIZE)
    b, g, r = np.meshgrid(grid, grid, grid, indexing="ij")  # Pillow's order: red varies fastest
    nodes = np.stack([r, g, b], -1).reshape(-1, 3)
    table = _rotate_hue(nodes, shift / 256.0).astype(np.float32).reshape(-1)
    return ImageFilter.Color3DLUT(_HUE_LUT_SIZE, table, channels=3)


def hue_shift(img: Image.Image, hue: float) -> Image.Image:
    """Rotate hue by ``hue`` (fraction of a turn), quantised to 1/256 turn as the reference's PIL path.

    One interpolating C pass through a cached 3-D table instead of two HSV conversions; within
    ~5/255 of the exact float result, like PIL's own 8-bit HSV path.
    """
    shift = round(hue * 256) % 256
    if shift == 0 or img.mode == "L":
        return img
    return img.filter(_hue_lut(shift))


def color_jitter(img: Image.Image, order, brightness: float, contrast: float, saturation: float,
                 hue: float) -> Image.Image:
    """ColorJitter with drawn factors, ops in ``order`` (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    lut: np.ndarray | None = None  # pending per-channel table: brightness/contrast not yet applied
    for op in order:
        if op == 0 and brightness != 1.0:
            step = blend_lut(brightness, 0.0)
            lut = step if lut is None else step[lut]
        elif op == 1 and contrast != 1.0:
            step = blend_lut(contrast, _mean_grey(img, lut))
            lut = step if lut is None else step[lut]
        elif op == 2 and saturation != 1.0:
            img, lut = saturate(_apply(img, lut), saturation), None
        elif op == 3:
            img, lut = hue_shift(_apply(img, lut), hue), None
    return _apply(img, lut)


def grayscale(img: Image.Image) -> Image.Image:
    """PIL's luma; kept single-channel (blur and solarize then touch a third of the bytes)."""
    return img.convert("L")


@functools.lru_cache(maxsize=4096)
def _kernel_std(sigma_milli: int) -> float:
    x = np.arange(BLUR_TAPS, dtype=np.float64) - BLUR_TAPS // 2
    w = np.exp(-0.5 * (x / (sigma_milli / 1000.0)) ** 2)
    return float(math.sqrt((w * x * x).sum() / w.sum()))


def reference_kernel_std(sigma: float) -> float:
    """Standard deviation of the reference's normalised 9-tap Gaussian kernel at ``sigma``."""
    return _kernel_std(max(1, round(sigma * 1000)))


def gaussian_blur(img: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur with the variance of the reference's 9-tap kernel (PIL's extended box blur)."""
    if sigma < _NO_OP_SIGMA:
        return img
    return img.filter(ImageFilter.GaussianBlur(reference_kernel_std(sigma)))


# Below this sigma the reference kernel's neighbour taps weigh < 1/1000 each: even a 0-to-255 edge
# moves by < 0.5, so the uint8 result equals the input (about 9 % of the draws in [0.1, 2]).
_NO_OP_SIGMA = 1.0 / math.sqrt(2.0 * math.log(1000.0))


@functools.lru_cache(maxsize=8)
def _solarize_table(threshold: int, bands: int) -> list[int]:
    return [v if v < threshold else 255 - v for v in range(256)] * bands


def solarize(img: Image.Image, threshold: int) -> Image.Image:
    """ImageOps.solarize: invert every value at or above ``threshold``."""
    return _point(img, _solarize_table(threshold, len(img.getbands())))
