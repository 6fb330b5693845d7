"""AdamW parameter groups: layer-wise LR decay, patch-embed LR multiplier, no weight decay on
biases / norms / LayerScale gammas / tokens, and the head's last layer tagged for freezing.

Names are the student's fully qualified names (``backbone.blocks.3.attn.qkv.weight``,
``dino_head.last_layer.weight_v`` ...).  FSDP2 keeps these names, so the same code serves plain
and sharded modules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

_TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.(?:(\d+)\.)?")


@dataclass(frozen=True)
class ParamGroupRule:
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2


def layer_id(name: str, num_layers: int, chunked: bool = False) -> int:
    """0 for the embeddings, i+1 for block i, num_layers+1 for everything after (norm, heads)."""
    if not name.startswith("backbone."):
        return num_layers + 1
    short = name[len("backbone."):]
    if short.startswith(_TOKEN_NAMES) or short.startswith("patch_embed"):
        return 0
    m = _BLOCK_RE.search(short)
    if m and short.startswith("blocks."):
        # Chunked layouts (blocks.<chunk>.<i>) carry the real index in the second group.
        idx = int(m.group(2)) if (chunked and m.group(2) is not None) else int(m.group(1))
        return idx + 1
    return num_layers + 1


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        param.ndim <= 1  # biases, norm weights (LayerNorm, the optional head BatchNorm), gammas
        or name.endswith(".bias")
        or "norm" in name
        or "gamma" in leaf
        or leaf in _TOKEN_NAMES
        or leaf.endswith("_g")  # weight-norm magnitude (fixed at 1 anyway)
    )


def param_multipliers(name: str, param: torch.Tensor, num_layers: int, rule: ParamGroupRule) -> dict:
    lid = layer_id(name, num_layers)
    lr_mult = rule.layerwise_decay ** (num_layers + 1 - lid)
    if "patch_embed" in name:
        lr_mult *= rule.patch_embed_lr_mult
    return {
        "lr_multiplier": lr_mult,
        "wd_multiplier": 0.0 if no_weight_decay(name, param) else 1.0,
        "is_last_layer": "last_layer" in name,
    }


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], num_layers: int, rule: ParamGroupRule
) -> list[dict]:
    """Fuse parameters sharing (lr mult, wd mult, last-layer flag) into one optimizer group."""
    groups: dict[tuple, dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        mult = param_multipliers(name, p, num_layers, rule)
        key = (round(mult["lr_multiplier"], 12), mult["wd_multiplier"], mult["is_last_layer"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {"params": [], "names": [], **mult}
        g["params"].append(p)
        g["names"].append(name)
    # Sorted so the optimizer's group order (and so its state-dict layout) is deterministic.
    return [groups[k] for k in sorted(groups)]


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    for g in optimizer.param_groups:
        base = last_layer_lr if g.get("is_last_layer", False) else lr
        g["lr"] = base * g.get("lr_multiplier", 1.0)
        g["weight_decay"] = wd * g.get("wd_multiplier", 1.0)
