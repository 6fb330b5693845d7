"""What a trained backbone sees: PCA of patch features and last-layer CLS attention."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_batch(images: Sequence[Image.Image], size: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """Resize (shorter side) + centre-crop to ``size``; return the normalised batch and the crops."""
    crops, tensors = [], []
    for img in images:
        s = size / min(img.size)
        img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
        left, top = (img.width - size) // 2, (img.height - size) // 2
        img = img.crop((left, top, left + size, top + size))
        arr = np.array(img, dtype=np.uint8)  # a writable copy for torch.from_numpy
        crops.append(arr)
        t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
        tensors.append((t - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])
    return torch.stack(tensors), crops


@torch.inference_mode()
def patch_pca(model, images: Sequence[Image.Image], size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First three principal components of the patch features (fit jointly over the images) as RGB."""
    x, crops = to_batch(images, size)
    feats = model.forward_features(x)["x_norm_patchtokens"].float()  # [B, N, D]
    b, n, d = feats.shape
    g = int(round(n ** 0.5))
    flat = feats.reshape(-1, d)
    flat = flat - flat.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)
    comps = (flat @ v[:3].T).reshape(b, g, g, 3)
    lo = comps.reshape(-1, 3).quantile(0.01, dim=0)
    hi = comps.reshape(-1, 3).quantile(0.99, dim=0)
    rgb = ((comps - lo) / (hi - lo + 1e-8)).clamp(0, 1)
    return crops, [(img.numpy() * 255).astype(np.uint8) for img in rgb]


@torch.inference_mode()
def cls_attention(model, images: Sequence[Image.Image], size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Head-averaged attention of the CLS token to the patches in the last block."""
    x, crops = to_batch(images, size)
    tokens = model.prepare_tokens_with_masks(x)
    for blk in model.blocks[:-1]:
        tokens = blk(tokens)
    last = model.blocks[-1]
    y = last.norm1(tokens)
    attn_mod = last.attn
    heads = attn_mod.num_heads
    b, t, d = y.shape
    qkv = attn_mod.qkv(y).reshape(b, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    attn = torch.softmax((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5, dim=-1)  # [B, H, T, T]
    n_prefix = 1 + int(getattr(model, "num_register_tokens", 0))
    cls_to_patch = attn[:, :, 0, n_prefix:].mean(1)  # [B, N]
    g = int(round(cls_to_patch.shape[1] ** 0.5))
    maps = cls_to_patch.reshape(b, 1, g, g)
    maps = F.interpolate(maps, size=(size, size), mode="nearest")[:, 0]
    out = []
    for m in maps:
        m = (m - m.min()) / (m.max() - m.min() + 1e-12)
        out.append(m.numpy())
    return crops, out
