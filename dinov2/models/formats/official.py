"""The official DINOv2 layout (torch.hub ``dinov2_vit*14[_reg4]_pretrain.pth``): the identity adapter.

Every other adapter converts to and from this layout, and the model's own state dict uses it.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from torch import Tensor

NAME = "official"
OFFICIAL_KEY = re.compile(
    r"^(cls_token|pos_embed|mask_token|register_tokens|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|mlp\.w12|mlp\.w3)\.(weight|bias)"
    r"|blocks\.\d+\.ls[12]\.gamma)$"
)


def claims(keys: set[str]) -> bool:
    # DINOv2 files carry a mask_token; DINO (2021) files have none and no LayerScale either.
    has_layerscale = any(k.endswith(".ls1.gamma") for k in keys)
    return "mask_token" in keys or not has_layerscale


def to_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    # Nothing to rename: keys the built model lacks are reported by the strict load ("unexpected").
    return dict(state), {}


def from_official(state: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    return OrderedDict(state)


def source_key(official_key: str) -> str:
    return official_key
