"""State-dict adapters, one module per layout users bring (as torchtitan keeps its per-model
``StateDictAdapter``): each maps its keys to and from the official layout and nothing else.

* :mod:`.official` - torch.hub / released ``.pth`` files and our own model (the identity);
* :mod:`.hf` - Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel``;
* :mod:`.timm` - timm ``vit_*_patch14[_reg4]_dinov2``.

An adapter has ``NAME``, ``claims(keys)``, ``to_official(state) -> (state, constructor hints)``,
``from_official(state)`` and ``source_key(official_key)`` (for error messages).
"""
from __future__ import annotations

from enum import Enum
from types import ModuleType

from . import hf, official, timm
from .keymap import KeyMapError


class WeightFormat(str, Enum):
    OFFICIAL = "official"
    HF = "hf"
    TIMM = "timm"


ADAPTERS: dict[str, ModuleType] = {official.NAME: official, hf.NAME: hf, timm.NAME: timm}


def adapter(name: str | WeightFormat) -> ModuleType:
    name = name.value if isinstance(name, WeightFormat) else name
    try:
        return ADAPTERS[name]
    except KeyError:
        raise KeyMapError(f"unknown weight format {name!r}; expected one of {sorted(ADAPTERS)}") from None


def detect_format(keys) -> str:
    """The layout a flat state dict's keys are in (HF names are unmistakable; timm lacks mask_token)."""
    keys = set(keys)
    for name in (hf.NAME, timm.NAME, official.NAME):
        if ADAPTERS[name].claims(keys):
            return name
    return official.NAME


__all__ = ["ADAPTERS", "KeyMapError", "WeightFormat", "adapter", "detect_format"]
