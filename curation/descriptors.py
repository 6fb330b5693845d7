"""Copy-detection descriptors built from ANY embedder's forward pass (``EmbedderConfig.descriptor``).

A global descriptor (one pass over the whole image) is weakest on crops and flips:
a mirrored photo or a 60 % crop lands at the same cosine as a different photo of
the same kind.  These wrappers keep ONE vector per image (so indexes, k-NN graphs
and the shard format are unchanged) and work on whatever ``forward`` maps
normalised pixels ``[B,3,S,S]`` to ``[B,D]`` — Lite0, a DINOv2 backbone or a
TorchScript model such as SSCD:

- ``global``: the model's output as it is (one pass);
- ``flip``: sum of the unit descriptors of the image and its mirror image (two
  passes).  Exactly flip-invariant: a flipped copy gets the same vector;
- ``regions``: sum of the unit descriptors of the whole image and of overlapping
  regions (four quadrant-anchored crops and a centre crop, each ``region_side`` of
  the side, resampled back to S), each also mirrored (twelve passes).  A crop of
  the image shares most regions with the original, so the aggregate moves less
  than a global descriptor does (R-MAC-style regional aggregation at image level).

Which one to use is a measurement (bench/curation_quality.py, bench/RESULTS.md):
the cost is the number of passes at embed time.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .choices import Descriptor

DESCRIPTORS = Descriptor.values()
PASSES = {"global": 1, "flip": 2, "regions": 12}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=1)


def region_boxes(side: int, region_side: float) -> list[tuple[int, int, int]]:
    """(top, left, size) of the square regions: four corners and the centre."""
    r = max(8, int(round(side * region_side)))
    far = side - r
    mid = far // 2
    return [(0, 0, r), (0, far, r), (far, 0, r), (far, far, r), (mid, mid, r)]


def wrap_forward(forward: Callable[[torch.Tensor], torch.Tensor], descriptor: str,
                 region_side: float = 0.7) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` turned into the ``descriptor`` aggregate (same [B,3,S,S] → [B,D] contract)."""
    if descriptor not in DESCRIPTORS:
        raise ValueError(f"descriptor {descriptor!r} not in {DESCRIPTORS}")
    if descriptor == "global":
        return forward

    def flip_sum(x: torch.Tensor) -> torch.Tensor:
        # one batch of 2B keeps the model's batching efficient
        both = forward(torch.cat([x, torch.flip(x, dims=(3,))]))
        b = x.shape[0]
        return _unit(both[:b]) + _unit(both[b:])

    if descriptor == "flip":
        return flip_sum

    def regions(x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1]
        total = flip_sum(x)
        for top, left, r in region_boxes(side, region_side):
            crop = x[:, :, top : top + r, left : left + r]
            crop = F.interpolate(crop, size=(x.shape[-2], side), mode="bilinear",
                                 align_corners=False, antialias=False)
            total = total + flip_sum(crop)
        return total

    return regions
