"""Synthetic copies for threshold calibration: the transformations copy-detection benchmarks use.

:func:`plant_copy` turns one image into a near-copy of a given family.  The families
follow the DISC21 / SSCD practice (crops of 50–95 % of the area, flips, rescales,
JPEG re-encodes, colour changes, small rotations, borders and overlays, and
combinations of several).  Calibration (curation/calibrate.py) plants them on a
random sample of the pool itself; the quality benchmark deliberately uses its own,
different set so that its numbers do not merely repeat what calibration saw.

Every copy is a deterministic function of the image and the generator state.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

FAMILIES = ("crop", "flip", "rescale", "reencode", "colour", "rotate", "border", "overlay", "combo")
# Families a combination draws from (a combo of combos adds nothing).
_COMBINABLE = ("crop", "flip", "rescale", "reencode", "colour", "rotate", "border", "overlay")


def _crop(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    w, h = img.size
    area = rng.uniform(0.5, 0.95)
    ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw = int(min(w, round(np.sqrt(area * ratio) * w)))
    ch = int(min(h, round(np.sqrt(area / ratio) * h)))
    cw, ch = max(8, cw), max(8, ch)
    x0, y0 = int(rng.integers(0, max(1, w - cw + 1))), int(rng.integers(0, max(1, h - ch + 1)))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _rescale(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    s = rng.uniform(0.3, 0.9)
    return img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.Resampling.BILINEAR)


def _reencode(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(20, 81)))
    with Image.open(io.BytesIO(buf.getvalue())) as out:
        return out.convert("RGB")


def _colour(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Color(img).enhance(rng.uniform(0.5, 1.5))


def _rotate(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    angle = rng.uniform(3, 10) * rng.choice([-1, 1])
    return img.rotate(float(angle), resample=Image.Resampling.BILINEAR, expand=False)


def _border(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    pad = max(1, int(round(rng.uniform(0.04, 0.12) * max(img.size))))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return ImageOps.expand(img, border=pad, fill=colour)


def _overlay(rng: np.random.Generator, img: Image.Image) -> Image.Image:
    out = img.copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    for _ in range(int(rng.integers(1, 4))):  # opaque boxes / strokes covering a few % of the image
        bw, bh = rng.uniform(0.05, 0.2) * w, rng.uniform(0.04, 0.12) * h
        x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.rectangle((x0, y0, x0 + bw, y0 + bh), fill=colour)
    return out


_OPS = {"crop": _crop, "flip": lambda rng, img: ImageOps.mirror(img), "rescale": _rescale,
        "reencode": _reencode, "colour": _colour, "rotate": _rotate, "border": _border, "overlay": _overlay}


def plant_copy(rng: np.random.Generator, img: Image.Image, family: str) -> tuple[Image.Image, str]:
    """A near-copy of ``img`` (RGB) of ``family``; returns the copy and the ops applied."""
    if family not in FAMILIES:
        raise ValueError(f"unknown copy family {family!r}; families: {FAMILIES}")
    if family == "combo":
        ops = list(rng.choice(_COMBINABLE, size=int(rng.integers(2, 5)), replace=False))
        if "reencode" in ops:  # re-encoding last, as a re-upload would
            ops.remove("reencode")
            ops.append("reencode")
    else:
        ops = [family]
    out = img.convert("RGB")
    for op in ops:
        out = _OPS[op](rng, out)
    return out, "+".join(ops)
