"""Photometric ops on small uint8 crops (H × W × 3 numpy arrays): the reference's colour jitter,
grayscale, blur and solarize with OpenCV's SIMD kernels instead of PIL/torch round trips.

The reference (torchvision v1 on PIL) applies ``ColorJitter`` through ``ImageEnhance`` (each factor
builds a second image and blends it), hue through PIL's 8-bit HSV, and blur as a float 9 × 9
convolution with two tensor round trips.  Here, for the same drawn parameters:

- brightness and contrast are per-channel maps ``floor(m + f (x - m))`` clipped to [0, 255] —
  PIL's blend arithmetic in float32 — so any run of them composes into one 256-entry table applied
  in one ``cv2.LUT`` pass (bit-exact with the reference);
- saturation is one colour-matrix pass (blend with the luma, PIL's weights);
- hue is the reference's own quantisation — 8-bit HSV hue (256 steps a turn) plus
  ``uint8(int(255 h))`` with wrap-around — through OpenCV's full-range HSV conversion;
- blur is the reference's normalised 9-tap Gaussian at that sigma, separable, with the same
  reflect padding (equal to torchvision's result up to ±1 rounding);
- grayscale keeps one channel (blur and solarize then touch a third of the bytes).
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

# One thread: a DataLoader worker is one core's worth of augmentation (and the benchmarks say so).
cv2.setNumThreads(1)

BLUR_TAPS = 9  # the reference's GaussianBlur kernel size
_LUMA = (0.299, 0.587, 0.114)  # PIL's "L" weights (ITU-R 601-2), used by ImageEnhance and grayscale
_IDENTITY = np.arange(256, dtype=np.float32)


def blend_lut(factor: float, degenerate: float) -> np.ndarray:
    """``Image.blend(degenerate, image, factor)`` per value: float32 maths, clip, truncate."""
    f = np.float32(factor)
    d = np.float32(degenerate)
    return np.clip(d + f * (_IDENTITY - d), 0.0, 255.0).astype(np.uint8)


def _apply(a: np.ndarray, lut: np.ndarray | None) -> np.ndarray:
    return a if lut is None else cv2.LUT(a, lut)


def _mean_grey(a: np.ndarray) -> int:
    """ImageEnhance.Contrast's degenerate value ``int(mean(L) + 0.5)``."""
    means = cv2.mean(a)
    if a.ndim == 2:
        return int(means[0] + 0.5)
    return int(_LUMA[0] * means[0] + _LUMA[1] * means[1] + _LUMA[2] * means[2] + 0.5)


def saturate(a: np.ndarray, factor: float) -> np.ndarray:
    """ImageEnhance.Color in one colour-matrix pass: blend with the luma by ``factor``."""
    if a.ndim == 2:
        return a
    m = np.empty((3, 4), dtype=np.float32)
    m[:, :3] = (1.0 - factor) * np.array(_LUMA, dtype=np.float32)
    m[np.arange(3), np.arange(3)] += factor
    m[:, 3] = -0.5  # cv2 rounds to nearest; PIL's blend truncates
    return cv2.transform(a, m)


@functools.lru_cache(maxsize=512)
def _hue_table(shift: int) -> np.ndarray:
    lut = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))
    lut[:, 0] = (np.arange(256) + shift) % 256  # hue only; saturation and value unchanged
    return lut.reshape(256, 1, 3)


def hue_shift(a: np.ndarray, hue: float) -> np.ndarray:
    """Rotate hue by ``hue`` turns exactly as the reference quantises it (8-bit HSV, int(255 h))."""
    shift = int(np.int32(hue * 255).astype(np.uint8))
    if shift == 0 or a.ndim == 2:
        return a
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV_FULL)
    return cv2.cvtColor(cv2.LUT(hsv, _hue_table(shift)), cv2.COLOR_HSV2RGB_FULL)


def color_jitter(a: np.ndarray, order, brightness: float, contrast: float, saturation: float,
                 hue: float) -> np.ndarray:
    """ColorJitter with drawn factors, ops in ``order`` (0 brightness, 1 contrast, 2 saturation, 3 hue)."""
    lut: np.ndarray | None = None  # pending per-channel table: brightness/contrast not yet applied
    for op in order:
        if op == 0 and brightness != 1.0:
            step = blend_lut(brightness, 0.0)
            lut = step if lut is None else step[lut]
        elif op == 1 and contrast != 1.0:
            a, lut = _apply(a, lut), None  # the mean grey is the current image's
            lut = blend_lut(contrast, _mean_grey(a))
        elif op == 2 and saturation != 1.0:
            a, lut = saturate(_apply(a, lut), saturation), None
        elif op == 3:
            a, lut = hue_shift(_apply(a, lut), hue), None
    return _apply(a, lut)


def grayscale(a: np.ndarray) -> np.ndarray:
    """Luma, single channel (PIL's weights)."""
    return a if a.ndim == 2 else cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)


@functools.lru_cache(maxsize=4096)
def _kernel(sigma_micro: int) -> np.ndarray:
    """The reference's kernel: exp(-x²/2σ²) on x = -4..4, normalised (torchvision's formula)."""
    x = np.linspace(-(BLUR_TAPS // 2), BLUR_TAPS // 2, BLUR_TAPS, dtype=np.float32)
    w = np.exp(-0.5 * (x / np.float32(sigma_micro / 1e6)) ** 2)
    return (w / w.sum()).astype(np.float32)


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """The reference's separable 9-tap Gaussian with reflect padding (torch's "reflect" = cv2's 101)."""
    k = _kernel(max(1, round(sigma * 1e6)))
    return cv2.sepFilter2D(a, -1, k, k, borderType=cv2.BORDER_REFLECT_101)


@functools.lru_cache(maxsize=8)
def _solarize_table(threshold: int) -> np.ndarray:
    v = np.arange(256)
    return np.where(v < threshold, v, 255 - v).astype(np.uint8)


def solarize(a: np.ndarray, threshold: int) -> np.ndarray:
    """ImageOps.solarize: invert every value at or above ``threshold``."""
    return cv2.LUT(a, _solarize_table(threshold))
