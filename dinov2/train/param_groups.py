"""AdamW parameter groups (layer-wise LR decay, patch-embed LR multiplier, which tensors skip weight
decay, the head's last layer tagged for freezing) and the last-layer freeze itself.

Names are the student's fully qualified names (``backbone.blocks.3.attn.qkv.weight``,
``dino_head.last_layer.weight`` ...).  FSDP2 keeps these names, so the same code serves plain and
sharded modules.  docs/fidelity.md compares every rule here with the reference implementations.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from dinov2.train.config import FreezeMode, WeightDecayExemption

_TOKEN_NAMES = ("cls_token", "pos_embed", "mask_token", "register_tokens")
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.(?:(\d+)\.)?")


@dataclass(frozen=True)
class ParamGroupRule:
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    wd_exemption: WeightDecayExemption = WeightDecayExemption.dinov2


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


def no_weight_decay(name: str, param: torch.Tensor,
                    exemption: WeightDecayExemption | str = WeightDecayExemption.dinov2) -> bool:
    exemption = WeightDecayExemption(exemption)
    if exemption is WeightDecayExemption.dino:
        return name.endswith(".bias") or param.ndim == 1
    # Substring tests as the reference's (our "backbone." / "dino_head." prefixes contain none of these
    # words).  1-D tensors too: the reference ViT and head have none outside those names, and it keeps the
    # optional head BatchNorm (which the DINOv2 reference refuses to train) out of the decay.
    dinov2 = name.endswith(".bias") or "norm" in name or "gamma" in name or param.ndim == 1
    if exemption is WeightDecayExemption.dinov2:
        return dinov2
    return dinov2 or name.rsplit(".", 1)[-1] in _TOKEN_NAMES


def param_multipliers(name: str, param: torch.Tensor, num_layers: int, rule: ParamGroupRule) -> dict:
    lid = layer_id(name, num_layers)
    lr_mult = rule.layerwise_decay ** (num_layers + 1 - lid)
    if "patch_embed" in name:
        lr_mult *= rule.patch_embed_lr_mult
    return {
        "lr_multiplier": lr_mult,
        "wd_multiplier": 0.0 if no_weight_decay(name, param, rule.wd_exemption) else 1.0,
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


@torch.no_grad()
def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create every parameter's AdamW state now, exactly as its first step would (zero moments, step 0).

    A parameter whose gradient is dropped (``FreezeMode.drop_grad``) would otherwise have no state until
    it thaws, and a checkpoint taken meanwhile could not be resumed (the distributed checkpoint needs the
    same state keys on save and load).  A step with zero gradients at LR 0 creates the state without moving
    anything (decoupled decay is scaled by the LR); resetting the counters makes it a fresh state.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    saved = [(g["lr"], g.get("weight_decay")) for g in optimizer.param_groups]
    grads = [p.grad for p in params]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p, grad in zip(params, grads):
        p.grad = grad
    for g, (lr, wd) in zip(optimizer.param_groups, saved):
        g["lr"] = lr
        if wd is not None:
            g["weight_decay"] = wd
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            step.zero_()
        elif step is not None:
            state["step"] = 0


def apply_last_layer_freeze(last_layer: Iterable[nn.Parameter], mode: FreezeMode | str, frozen: bool) -> None:
    """Call after clipping, before ``optimizer.step()``; the LR schedule already holds the layer's LR at 0."""
    if frozen and FreezeMode(mode) is FreezeMode.drop_grad:
        for p in last_layer:
            p.grad = None
