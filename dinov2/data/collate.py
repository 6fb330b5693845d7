"""Batch multi-crop samples and draw the iBOT masks for the global crops.

Layout (crop-major, as the trainer expects): ``collated_global_crops[c * B + b]`` is global crop
``c`` of sample ``b``; the same for local crops.  Of the ``2B`` global crops,
``int(2B * mask_probability)`` get a block mask; their mask ratios are spread over
``[ratio_min, ratio_max]`` (crop ``i`` draws uniformly in the ``i``-th of equal sub-intervals),
and the masked crops are placed at random positions.

uint8 crops (:meth:`DataAugmentationDINO.crops_uint8`) are stacked as uint8 and normalised once
for the whole batch (``normalize=(mean, std)``); crops whose photometric ops are left to the
device stay uint8 and carry their packed parameters (``collated_*_crops_params``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dinov2.data.masking import MaskingGenerator

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def collate_data_and_cast(
    samples_list: Sequence[Any],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: str | torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: np.random.Generator | None = None,
    normalize: tuple[Sequence[float], Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Stack crops and build masks.  ``samples_list`` items are augmentation dicts or (dict, label)."""
    if not samples_list:
        raise ValueError("cannot collate an empty batch")
    samples = [s[0] if isinstance(s, (tuple, list)) else s for s in samples_list]
    dtype = resolve_dtype(dtype)
    rng = rng if rng is not None else np.random.default_rng()
    n_global = len(samples[0]["global_crops"])
    n_local = len(samples[0]["local_crops"])

    global_list = [s["global_crops"][c] for c in range(n_global) for s in samples]
    local_list = [s["local_crops"][c] for c in range(n_local) for s in samples]
    extra: dict[str, Any] = {}
    if global_list[0].dtype == torch.uint8 and normalize is not None and samples[0].get("photometric_done", True):
        from dinov2.data.augment import normalize_uint8

        # One normalisation pass for the whole batch instead of one per crop in the workers.
        global_crops = normalize_uint8(global_list, *normalize, dtype)
        local_crops = normalize_uint8(local_list, *normalize, dtype) if n_local else None
    else:
        global_crops = torch.stack(global_list)
        local_crops = torch.stack(local_list) if n_local else None
        if global_crops.dtype == torch.uint8 and not samples[0].get("photometric_done", True):
            from dinov2.data.augment_device import pack_params

            # Flip and colour happen on the device (augment_device.augment_batch), which casts.
            extra["collated_global_crops_params"] = pack_params(
                [s["params"][c] for c in range(n_global) for s in samples])
            extra["collated_local_crops_params"] = pack_params(
                [s["params"][n_global + c] for c in range(n_local) for s in samples])
            dtype = torch.uint8
    if local_crops is None:
        local_crops = torch.empty(0, *global_crops.shape[1:2], 0, 0, dtype=global_crops.dtype)

    n_images = global_crops.shape[0]
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator")
    n_tokens = n_tokens if n_tokens is not None else mask_generator.num_patches
    lo, hi = mask_ratio_tuple
    n_masked_images = int(n_images * mask_probability)
    bounds = np.linspace(lo, hi, n_masked_images + 1)
    masks: list[np.ndarray] = []
    upperbound = 0
    for i in range(n_masked_images):
        ratio = rng.uniform(bounds[i], bounds[i + 1])
        masks.append(mask_generator(int(n_tokens * ratio), rng=rng).reshape(-1))
        upperbound += int(n_tokens * bounds[i + 1])
    empty = np.zeros(n_tokens, dtype=bool)
    masks.extend(empty for _ in range(n_images - n_masked_images))
    order = rng.permutation(n_images)
    collated_masks = torch.from_numpy(np.stack([masks[i] for i in order]))

    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    # Each masked patch weighs 1 / (#masked patches of its image): every image counts equally.
    per_image = 1.0 / collated_masks.sum(-1).clamp(min=1).to(torch.float32)
    masks_weight = per_image.unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    return {
        **extra,
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=int(mask_indices_list.shape[0]), dtype=torch.long),
    }
