"""Robust image decoding shared by the curation pipeline and the trainer's loader.

Every failure becomes a :class:`DecodeError` whose ``reason`` is a short, stable
code (for manifests and metrics) plus a human-readable detail.  Odd modes are
normalised to 8-bit RGB: EXIF orientation applied, CMYK/palette/16-bit/greyscale
converted, alpha composited on white.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Default decompression-bomb limit: 8,192 x 8,192 pixels (PIL's own default warns at ~89M).
DEFAULT_MAX_PIXELS = 8192 * 8192

REASONS = (
    "empty",  # zero bytes
    "not_an_image",  # PIL cannot identify the format
    "too_large",  # width*height above the decompression-bomb limit
    "truncated",  # data ends before the image does
    "corrupt",  # any other decoder failure
)


class DecodeError(Exception):
    def __init__(self, reason: str, detail: str = ""):
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, EXIF-transposed
    format: str  # "JPEG", "PNG", ...
    original_mode: str
    width: int  # after EXIF transpose
    height: int


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale the actual range to 8 bits instead of clipping.
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if hi > 255 else 1.0
        arr8 = np.clip(arr * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr8 = ((arr - lo) / (hi - lo + 1e-12) * 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode ``data`` to an RGB PIL image or raise :class:`DecodeError`."""
    if not data:
        raise DecodeError("empty", "zero-byte file")
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        # PIL's own bomb check would fire before ours; ours is the limit the caller asked for.
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's bomb warning: we check the size ourselves
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError("too_large", f"{w}x{h} exceeds {max_pixels} pixels")
            original_mode = img.mode
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # the default returns a full copy
            img = _to_rgb(img)
    except DecodeError:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeError("not_an_image", str(exc)) from None
    except Image.DecompressionBombError as exc:
        raise DecodeError("too_large", str(exc)) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        reason = "truncated" if ("truncated" in text.lower() or isinstance(exc, EOFError)) else "corrupt"
        raise DecodeError(reason, text) from None
    except Exception as exc:  # noqa: BLE001 - any decoder bug is a per-image failure, never a crash
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from None
    return DecodedImage(image=img, format=fmt, original_mode=original_mode, width=img.size[0], height=img.size[1])
