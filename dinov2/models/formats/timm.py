"""timm ``vit_{small,base,large,giant}_patch14[_reg4]_dinov2`` state dicts <-> the official layout.

timm keeps the hub names except: no ``mask_token``; ``register_tokens`` is ``reg_token``; in the
register models the CLS position is folded into ``cls_token`` (cls + pos_embed[:, 0]) and dropped
from ``pos_embed`` (no embedding for prefix tokens); the fused SwiGLU ``w12`` / ``w3`` is
``fc1`` / ``fc2``.  timm resizes positions by target size with antialiasing, with or without
registers, so a model loaded from timm does the same.
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .keymap import KeyMapError, preview
from .official import OFFICIAL_KEY

NAME = "timm"
_MLP = re.compile(r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$")
HINTS = {"interpolate_offset": 0.0, "interpolate_antialias": True}


def claims(keys: set[str]) -> bool:
    # timm drops mask_token (the official files and ours always have one when they have LayerScale).
    return "reg_token" in keys or ("mask_token" not in keys and any(k.endswith(".ls1.gamma") for k in keys))


def _is_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n


def _swiglu_blocks(state: Mapping[str, Tensor]) -> set[str]:
    """Block indices whose fc1 is a packed SwiGLU (output twice fc2's input)."""
    packed = set()
    for key, value in state.items():
        m = _MLP.match(key)
        if m and m.group(2) == "fc1" and m.group(3) == "weight":
            fc2 = state.get(f"blocks.{m.group(1)}.mlp.fc2.weight")
            if fc2 is not None and value.shape[0] == 2 * fc2.shape[-1]:
                packed.add(m.group(1))
    return packed


def to_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    out: dict[str, Tensor] = {}
    packed = _swiglu_blocks(state)
    for key, value in state.items():
        if key == "reg_token":
            out["register_tokens"] = value
        elif m := _MLP.match(key):
            if m.group(1) in packed:
                key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
            out[key] = value
        elif key == "mask_token":
            raise KeyMapError("timm layout: has a mask_token (timm checkpoints have none)")
        else:
            out[key] = value
    foreign = [k for k in out if not OFFICIAL_KEY.match(k)]
    if foreign:
        raise KeyMapError(f"timm layout: keys that do not map to the backbone: {preview(foreign)}")
    for needed in ("pos_embed", "cls_token"):
        if needed not in out:
            raise KeyMapError(f"timm layout: missing {needed!r}")
    pos = out["pos_embed"]
    if pos.dim() != 3:
        raise KeyMapError(f"timm layout: 'pos_embed' has shape {tuple(pos.shape)}, expected [1, N, D]")
    # No CLS entry (register models): the CLS position is already inside cls_token.
    if _is_square(pos.shape[1]) and ("reg_token" in state or not _is_square(pos.shape[1] - 1)):
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    out["mask_token"] = pos.new_zeros(1, pos.shape[-1])  # not trained by timm; the reference init
    return out, dict(HINTS)


def from_official(state: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    out: OrderedDict[str, Tensor] = OrderedDict()
    registers = "register_tokens" in state
    for key, value in state.items():
        if key == "mask_token":
            continue
        if key == "register_tokens":
            out["reg_token"] = value
        elif key == "cls_token" and registers:
            out[key] = (value + state["pos_embed"][:, :1]).contiguous()
        elif key == "pos_embed" and registers:
            out[key] = value[:, 1:].clone()
        else:
            out[key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")] = value
    return out


def source_key(official_key: str) -> str:
    if official_key == "register_tokens":
        return "reg_token"
    return official_key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
