"""Hugging Face ``transformers`` ``Dinov2Model`` / ``Dinov2WithRegistersModel`` <-> the official layout.

Files on the Hub use ``embeddings.*``, ``encoder.layer.{i}.*`` and ``layernorm.*``, with the fused
``qkv`` split into ``attention.attention.{query,key,value}`` (official qkv = their concatenation
along dim 0).  transformers 5 renames those to ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj`` in
memory: both spellings are read, the Hub one is written.  HF blocks always have LayerScale
(``lambda1``); a model without it is written with ones.  HF resizes positions by target size,
antialiased only in the register model, so a model loaded from HF does the same.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .keymap import KeyMap, KeyMapError, preview

NAME = "hf"
_L = "encoder.layer.{i}."
KEYS = KeyMap([
    ("cls_token", "embeddings.cls_token"),
    ("mask_token", "embeddings.mask_token"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("register_tokens", "embeddings.register_tokens"),
    ("patch_embed.proj.{p}", "embeddings.patch_embeddings.projection.{p}"),
    ("blocks.{i}.norm1.{p}", _L + "norm1.{p}"),
    ("blocks.{i}.attn.proj.{p}", _L + "attention.output.dense.{p}"),
    ("blocks.{i}.ls1.gamma", _L + "layer_scale1.lambda1"),
    ("blocks.{i}.norm2.{p}", _L + "norm2.{p}"),
    ("blocks.{i}.mlp.fc1.{p}", _L + "mlp.fc1.{p}"),
    ("blocks.{i}.mlp.fc2.{p}", _L + "mlp.fc2.{p}"),
    ("blocks.{i}.mlp.w12.{p}", _L + "mlp.weights_in.{p}"),
    ("blocks.{i}.mlp.w3.{p}", _L + "mlp.weights_out.{p}"),
    ("blocks.{i}.ls2.gamma", _L + "layer_scale2.lambda1"),
    ("norm.{p}", "layernorm.{p}"),
])
# transformers 5 in-memory names (read only).
ALIASES = KeyMap([
    ("blocks.{i}.attn.proj.{p}", _L + "attention.o_proj.{p}"),
])
_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$")
_PARTS = ("query", "key", "value")
_SHORT = {"q": "query", "k": "key", "v": "value"}
PREFIXES = ("dinov2.", "dinov2_with_registers.", "model.")


def claims(keys: set[str]) -> bool:
    return any(k.startswith(("embeddings.", "encoder.layer.")) for k in keys)


def strip_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop a task model's base-model prefix (``dinov2.`` …) when every key has it."""
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def interpolation_hints(registers: bool) -> dict[str, Any]:
    return {"interpolate_offset": 0.0, "interpolate_antialias": registers}


def to_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    state = strip_prefix(state)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unmapped = []
    for key, value in state.items():
        m = _QKV.match(key)
        if m:
            part = m.group(2) or _SHORT[m.group(3)]
            qkv.setdefault((m.group(1), m.group(4)), {})[part] = value
            continue
        new = KEYS.to_official(key) or ALIASES.to_official(key)
        if new is None:
            unmapped.append(key)
        elif new in out:
            raise KeyMapError(f"hf layout: two keys map to {new!r} (one of them is {key!r})")
        else:
            out[new] = value
    if unmapped:
        raise KeyMapError(f"hf layout: keys that do not map to the backbone: {preview(unmapped)}")
    for (block, param), parts in sorted(qkv.items()):
        absent = [p for p in _PARTS if p not in parts]
        if absent:
            raise KeyMapError(
                "hf layout: missing "
                + preview(f"encoder.layer.{block}.attention.attention.{p}.{param}" for p in absent)
            )
        shapes = {tuple(parts[p].shape) for p in _PARTS}
        if len(shapes) != 1:
            raise KeyMapError(
                f"hf layout: encoder.layer.{block}.attention.attention.query/key/value.{param} "
                f"have different shapes {sorted(shapes)}"
            )
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts[p] for p in _PARTS], dim=0)
    return out, interpolation_hints("register_tokens" in out)


def from_official(state: Mapping[str, Tensor]) -> OrderedDict[str, Tensor]:
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in state.items():
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            for part, chunk in zip(_PARTS, value.chunk(3, dim=0)):
                out[f"encoder.layer.{m.group(1)}.attention.attention.{part}.{m.group(2)}"] = chunk.clone()
            continue
        new = KEYS.from_official(key)
        if new is None:
            raise KeyMapError(f"hf layout: no Hugging Face name for {key!r}")
        out[new] = value
    return out


def source_key(official_key: str) -> str:
    m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", official_key)
    if m:
        return f"encoder.layer.{m.group(1)}.attention.attention.{{query,key,value}}.{m.group(2)}"
    return KEYS.from_official(official_key) or official_key
