"""Blockwise patch masks for iBOT (rectangles of patches, like BEiT's block masking).

A mask for ``n`` patches is built by repeatedly dropping a rectangle of random area in
``[min_num_patches, min(remaining, max_num_patches)]`` with log-uniform aspect ratio in
``[min_aspect, max_aspect]`` at a random place; a rectangle is only accepted if it adds at least
one new patch without overshooting the target.  It stops when the target is met or no rectangle
fits any more (so a mask may hold slightly fewer patches than asked).  All randomness comes from
the caller's ``numpy.random.Generator`` (seeded per batch for exact resume).
"""
from __future__ import annotations

import math

import numpy as np


class MaskingGenerator:
    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if self.height <= 0 or self.width <= 0:
            raise ValueError(f"mask grid must be positive, got {self.height}x{self.width}")
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = int(self.num_patches if max_num_patches is None else max_num_patches)
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}")
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (f"MaskingGenerator({self.height}x{self.width}, min={self.min_num_patches}, "
                f"max={self.max_num_patches}, log_aspect={self.log_aspect})")

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        """Try up to 10 rectangles; return how many new patches the accepted one masked."""
        for _ in range(10):
            area = rng.uniform(self.min_num_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = round(math.sqrt(area * aspect))
            w = round(math.sqrt(area / aspect))
            # Rounding can shrink a block below the minimum: redraw instead.
            if 0 < h < self.height and 0 < w < self.width and h * w >= self.min_num_patches:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    return new
        return 0

    def __call__(self, num_masking_patches: int | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        target = self.num_masking_patches if num_masking_patches is None else num_masking_patches
        if target is None:
            raise ValueError("number of patches to mask not given")
        rng = rng if rng is not None else np.random.default_rng()
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < target:
            budget = min(target - count, self.max_num_patches)
            if budget < self.min_num_patches:
                break  # a block smaller than the minimum is never drawn
            added = self._add_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask
