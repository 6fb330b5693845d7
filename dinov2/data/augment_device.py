"""Flip + colour jitter + grayscale + blur + solarize + normalisation of uint8 crops on the device.

With ``crops.colour_ops_on: cuda`` the loader workers only decode and crop+resize (uint8), and the
per-crop random parameters — drawn on the CPU by the same
:meth:`~dinov2.data.augment.DataAugmentationDINO.sample_params`, so the distributions are the CPU
path's — travel with the batch as small tensors (:func:`pack_params`).  :func:`apply_photometric`
then runs the whole batch through plain tensor ops on whatever device the crops are on (the tests
run it on CPU tensors).  Semantics are torchvision's tensor kernels (float in [0, 1], clamped after
each op, float HSV hue with the reference's 1/256-turn quantisation of the shift, the reference's
9-tap Gaussian with reflect padding), with each crop's own factors and op order.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as Fn

from dinov2.data.colour import BLUR_TAPS

_LUMA = (0.299, 0.587, 0.114)
_FIELDS = ("flip", "jitter", "order", "factors", "grayscale", "blur", "sigma", "solarize")


def pack_params(params: Sequence) -> dict[str, torch.Tensor]:
    """``CropParams`` of a batch's crops (in the collated order) → tensors, one row per crop."""
    return {
        "flip": torch.tensor([p.flip for p in params], dtype=torch.bool),
        "jitter": torch.tensor([p.jitter for p in params], dtype=torch.bool),
        "order": torch.tensor([list(p.jitter_order) for p in params], dtype=torch.long).view(-1, 4),
        "factors": torch.tensor([[p.brightness, p.contrast, p.saturation, p.hue] for p in params],
                                dtype=torch.float32).view(-1, 4),
        "grayscale": torch.tensor([p.grayscale for p in params], dtype=torch.bool),
        "blur": torch.tensor([p.blur for p in params], dtype=torch.bool),
        "sigma": torch.tensor([p.sigma for p in params], dtype=torch.float32),
        "solarize": torch.tensor([p.solarize for p in params], dtype=torch.bool),
    }


def _luma(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (other + f.view(-1, 1, 1, 1) * (x - other)).clamp_(0.0, 1.0)


def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Exact HSV hue rotation by ``shift`` turns per crop (torchvision's tensor formula)."""
    hi, lo = x.max(1, keepdim=True).values, x.min(1, keepdim=True).values
    chroma = hi - lo
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    h = torch.where(hi == r, ((g - b) / safe) % 6.0,
                    torch.where(hi == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (h + 6.0 * shift.view(-1, 1, 1, 1) + offsets) % 6.0
    return (hi - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)).clamp_(0.0, 1.0)


def _jitter_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if op == 0:
        return _blend(x, torch.zeros_like(x[:, :1]), f[:, 0])
    if op == 1:
        return _blend(x, _luma(x).mean((2, 3), keepdim=True), f[:, 1])
    if op == 2:
        return _blend(x, _luma(x), f[:, 2])
    # The reference's (and the CPU path's) 8-bit HSV quantisation: int(255 h) steps of 1/256 turn.
    return _hue(x, torch.trunc(f[:, 3] * 255.0) / 256.0)


def _blur(x: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Separable 9-tap Gaussian per crop (reflect padding); crops with ``on`` false are untouched."""
    n, c, h, w = x.shape
    t = torch.arange(BLUR_TAPS, dtype=x.dtype, device=x.device) - BLUR_TAPS // 2
    k = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    k = k / k.sum(1, keepdim=True)
    delta = (t == 0).to(x.dtype).expand_as(k)
    k = torch.where(on.view(-1, 1), k, delta).repeat_interleave(c, 0)  # (n*c, 9)
    pad = BLUR_TAPS // 2
    y = Fn.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = Fn.conv2d(y, k.view(n * c, 1, 1, BLUR_TAPS), groups=n * c)
    y = Fn.conv2d(y, k.view(n * c, 1, BLUR_TAPS, 1), groups=n * c)
    return y.view(n, c, h, w)


def apply_photometric(crops: torch.Tensor, params: dict[str, torch.Tensor], mean: Sequence[float],
                      std: Sequence[float], dtype: torch.dtype = torch.float32,
                      solarize_threshold: int = 128) -> torch.Tensor:
    """uint8 (N, 3, H, W) crops + packed params → normalised ``dtype`` crops, on ``crops.device``."""
    if crops.dtype != torch.uint8 or crops.ndim != 4 or crops.shape[1] != 3:
        raise ValueError(f"expected uint8 crops of shape (N, 3, H, W), got {crops.dtype} {tuple(crops.shape)}")
    dev = crops.device
    p = {k: params[k].to(dev, non_blocking=True) for k in _FIELDS}
    if p["flip"].shape[0] != crops.shape[0]:
        raise ValueError(f"{p['flip'].shape[0]} parameter rows for {crops.shape[0]} crops")
    x = crops.to(torch.float32).div_(255.0)
    x = torch.where(p["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
    for slot in range(4):  # the k-th op of each crop's own random order
        for op in range(4):
            sel = (p["jitter"] & (p["order"][:, slot] == op)).nonzero().flatten()
            if sel.numel():
                x[sel] = _jitter_op(op, x[sel], p["factors"][sel])
    x = torch.where(p["grayscale"].view(-1, 1, 1, 1), _luma(x).expand_as(x), x)
    if bool(p["blur"].any()):
        x = _blur(x, p["sigma"], p["blur"])
    # PIL solarizes the uint8 value v >= threshold; the float equivalent of round(255 x) >= threshold.
    sol = p["solarize"].view(-1, 1, 1, 1) & (x * 255.0 >= solarize_threshold - 0.5)
    x = torch.where(sol, 1.0 - x, x)
    m = torch.tensor(mean, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def augment_batch(batch: dict, device: torch.device | str, mean: Sequence[float], std: Sequence[float],
                  dtype: torch.dtype = torch.float32, solarize_threshold: int = 128) -> dict:
    """Move a geometry-only batch's uint8 crops to ``device`` and finish them there (in place)."""
    for key in ("collated_global_crops", "collated_local_crops"):
        crops = batch[key].to(device, non_blocking=True)
        if crops.numel():
            batch[key] = apply_photometric(crops, batch.pop(f"{key}_params"), mean, std, dtype, solarize_threshold)
        else:
            batch.pop(f"{key}_params", None)
            batch[key] = crops.to(dtype)
    return batch
