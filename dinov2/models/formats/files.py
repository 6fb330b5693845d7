"""Weight files beyond ``torch.save``: ``.safetensors`` (with our metadata) and Hugging Face folders.

safetensors holds tensors only (no code can run on load) plus a ``str -> str`` metadata table; ours
records what the tensors cannot: the head count, the position-resize mode and the LayerNorm eps, so
a file reproduces the model it came from exactly.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...utils.io import atomic_path
from . import hf

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HF_MODEL_TYPES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
_META_PREFIX = "dinov2."


class WeightsFileError(ValueError):
    """A weights file or folder cannot be read (the message says why)."""


def is_safetensors(path: str | Path) -> bool:
    return str(path).endswith(".safetensors")


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsFileError(f"{path}: not a readable safetensors file ({exc})") from exc
    return state, metadata


def write_safetensors(path: str | Path, state: Mapping[str, Tensor], metadata: Mapping[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    return path


def hints_to_metadata(layout: str, hints: Mapping[str, Any]) -> dict[str, str]:
    meta = {_META_PREFIX + "layout": layout}
    for key, value in hints.items():
        meta[_META_PREFIX + key] = json.dumps(value)
    return meta


_HINT_TYPES = {"num_heads": int, "interpolate_offset": float, "interpolate_antialias": bool, "norm_eps": float}


def metadata_to_hints(metadata: Mapping[str, str], where: str) -> tuple[str | None, dict[str, Any]]:
    """(layout, constructor hints) recorded by :func:`hints_to_metadata`; other entries are ignored."""
    hints: dict[str, Any] = {}
    for name, kind in _HINT_TYPES.items():
        text = metadata.get(_META_PREFIX + name)
        if text is None:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, kind) and not (kind is float and isinstance(value, int)):
            raise WeightsFileError(f"{where}: metadata {_META_PREFIX + name}={text!r} is not a {kind.__name__}")
        hints[name] = kind(value)
    return metadata.get(_META_PREFIX + "layout"), hints


# ------------------------------------------------------------------------- Hugging Face folders
def is_hf_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsFileError(f"{folder}/config.json: not readable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise WeightsFileError(f"{folder}/config.json: expected a JSON object")
    kind = config.get("model_type")
    if kind not in HF_MODEL_TYPES:
        raise WeightsFileError(
            f"{folder}/config.json: model_type {kind!r} is not one of {sorted(HF_MODEL_TYPES)}"
        )
    if config.get("hidden_act", "gelu") != "gelu":
        raise WeightsFileError(f"{folder}/config.json: hidden_act {config['hidden_act']!r} (only 'gelu' is supported)")
    return config


def hf_config_hints(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor hints, values the tensors must agree with) from an HF ``config.json``."""
    hints: dict[str, Any] = hf.interpolation_hints(config["model_type"] == "dinov2_with_registers")
    if "num_attention_heads" in config:
        hints["num_heads"] = int(config["num_attention_heads"])
    if "layer_norm_eps" in config:
        hints["norm_eps"] = float(config["layer_norm_eps"])
    expect = {
        ours: int(config[theirs])
        for ours, theirs in (("embed_dim", "hidden_size"), ("depth", "num_hidden_layers"),
                             ("patch_size", "patch_size"), ("num_register_tokens", "num_register_tokens"))
        if theirs in config
    }
    return hints, expect


def read_torch_file(path: str | Path) -> Any:
    """``torch.load`` a file safely (``weights_only=True``), turning failures into :class:`WeightsFileError`."""
    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise WeightsFileError(f"{path}: file is empty")
    with path.open("rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (PK\x03\x04); pre-1.6 files are a raw pickle (protocol byte 0x80).
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise WeightsFileError(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; "
            "safetensors files must end in .safetensors)"
        )
    try:
        # DINO (2021) training checkpoints carry their argparse.Namespace; it is plain data.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc).strip()
        if "weights only load failed" not in text.lower():
            raise WeightsFileError(
                f"{path}: not a readable PyTorch checkpoint (UnpicklingError: {text})"
            ) from exc
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f" such as {unsupported.group(1)}" if unsupported else ""
        raise WeightsFileError(
            f"{path}: refused by torch.load(weights_only=True): it holds arbitrary Python objects{what}, "
            "not just tensors; re-save it as a plain state dict"
        ) from exc
    except Exception as exc:  # torch.load raises many types on corrupt input (EOF, zip, index errors)
        raise WeightsFileError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def read_hf_folder(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(state dict in HF names, constructor hints, expected shape values) of a transformers folder."""
    folder = Path(folder)
    config = read_hf_config(folder)
    hints, expect = hf_config_hints(config)
    if (folder / "model.safetensors").is_file():
        state, metadata = read_safetensors(folder / "model.safetensors")
        # Written by `dinov2 export`: the source model's own resize rule and eps reproduce it exactly.
        _, recorded = metadata_to_hints(metadata, str(folder / "model.safetensors"))
        if recorded.get("num_heads", hints.get("num_heads")) != hints.get("num_heads"):
            raise WeightsFileError(f"{folder}: config.json and model.safetensors disagree on the head count")
        hints.update(recorded)
    elif (folder / "model.safetensors.index.json").is_file():
        state = _read_sharded(folder, folder / "model.safetensors.index.json")
    elif (folder / "pytorch_model.bin").is_file():
        state = read_torch_file(folder / "pytorch_model.bin")
    else:
        raise WeightsFileError(f"{folder}: has config.json but none of {', '.join(HF_WEIGHTS)}")
    return state, hints, expect


def _read_sharded(folder: Path, index: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsFileError(f"{index}: not a safetensors index ({exc})") from exc
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard:  # names only: an index must not point outside its folder
            raise WeightsFileError(f"{index}: shard name {shard!r} is not a plain file name")
        part, _ = read_safetensors(folder / shard)
        state.update(part)
    absent = sorted(set(weight_map) - set(state))
    if absent:
        raise WeightsFileError(f"{index}: tensors listed but not in the shards: {absent[:5]}")
    return state


def hf_config_for(model: torch.nn.Module) -> dict[str, Any]:
    """The ``config.json`` that makes ``AutoModel.from_pretrained`` build ``model``'s architecture."""
    registers = int(model.num_register_tokens)
    kind = "dinov2_with_registers" if registers else "dinov2"
    block = model.blocks[0]
    swiglu = hasattr(block.mlp, "w12")
    hidden = block.mlp.w3.in_features if swiglu else block.mlp.fc1.out_features
    config: dict[str, Any] = {
        "architectures": [HF_MODEL_TYPES[kind]],
        "model_type": kind,
        "hidden_size": int(model.embed_dim),
        "num_hidden_layers": len(model.blocks),
        "num_attention_heads": int(model.num_heads),
        # transformers 5 wants an int here (ViT-g's SwiGLU width 4096 comes from ratio 4).
        "mlp_ratio": 4 if swiglu else (hidden // model.embed_dim if hidden % model.embed_dim == 0
                                       else hidden / model.embed_dim),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": float(model.norm.eps),
        "image_size": int(model.img_size),
        "patch_size": int(model.patch_size),
        "num_channels": int(model.patch_embed.proj.in_channels),
        "qkv_bias": True,
        "layerscale_value": 1.0,
        "drop_path_rate": 0.0,
        "use_swiglu_ffn": swiglu,
        "use_mask_token": True,
        "torch_dtype": "float32",
    }
    if registers:
        config["num_register_tokens"] = registers
    return config
