"""Write a backbone in the layout a user's library reads: official (``.pth`` / ``.safetensors``),
Hugging Face (a folder ``AutoModel.from_pretrained`` opens) or timm (``.pth`` / ``.safetensors``).

An export must reproduce the model exactly or refuse.  The head count cannot be read off the
tensors: ``.safetensors`` metadata and HF ``config.json`` record it, a ``.pth`` cannot, so a model
whose head count differs from the width's default is refused as ``.pth``.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..utils.io import atomic_open, atomic_write_text
from .checkpoint import CheckpointError, export_official
from .formats import WeightFormat, adapter
from .formats.files import hf_config_for, hints_to_metadata, is_safetensors, write_safetensors
from .vit import DinoVisionTransformer, default_num_heads


@dataclass
class ExportResult:
    path: Path
    tensors: int
    parameters: int
    notes: list[str] = field(default_factory=list)


def model_hints(model: DinoVisionTransformer) -> dict:
    """Constructor values a loader cannot infer from the tensors (recorded where a format allows)."""
    return {
        "num_heads": int(model.num_heads),
        "interpolate_offset": float(model.interpolate_offset),
        "interpolate_antialias": bool(model.interpolate_antialias),
        "norm_eps": float(model.norm.eps),
    }


def _complete_for_library(model: DinoVisionTransformer, state: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """HF and timm DINOv2 blocks always have LayerScale and biases: absent ones are exact no-ops."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    dim = model.embed_dim
    for key, value in state.items():
        out[key] = value
    for i in range(len(model.blocks)):
        for ls in ("ls1", "ls2"):
            out.setdefault(f"blocks.{i}.{ls}.gamma", torch.ones(dim))
        for linear in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "mlp.w12", "mlp.w3"):
            weight = state.get(f"blocks.{i}.{linear}.weight")
            if weight is not None:
                out.setdefault(f"blocks.{i}.{linear}.bias", torch.zeros(weight.shape[0]))
    return out


def _position_note(model: DinoVisionTransformer, fmt: WeightFormat) -> str | None:
    """Say when the target library resizes positions differently from the model (other grids only)."""
    if fmt is WeightFormat.OFFICIAL:
        return None
    registers = model.num_register_tokens > 0
    theirs = (0.0, registers) if fmt is WeightFormat.HF else (0.0, True)
    ours = (float(model.interpolate_offset), bool(model.interpolate_antialias))
    if ours == theirs:
        return None
    grid = model.img_size // model.patch_size
    return (
        f"note: {fmt.value} resizes position embeddings by target size (antialias={theirs[1]}); this model "
        f"uses offset={ours[0]}, antialias={ours[1]}: features are identical on the {grid}x{grid} grid "
        f"({model.img_size} px) and differ slightly at other resolutions"
    )


def _refuse_unrecorded_heads(model: DinoVisionTransformer, out: Path, fmt: WeightFormat) -> None:
    default = default_num_heads(model.embed_dim)
    if model.num_heads != default:
        raise CheckpointError(
            f"{out}: the model has {model.num_heads} attention heads but a {fmt.value} .pth cannot record "
            f"that and loaders would build {default} (the default for width {model.embed_dim}); write "
            f"a .safetensors file or --format hf instead (both record num_heads)"
        )


def export_weights(model: DinoVisionTransformer, out: str | Path, fmt: WeightFormat | str) -> ExportResult:
    """Write ``model`` to ``out`` in ``fmt`` (atomically); HF writes a folder."""
    fmt = WeightFormat(fmt)
    out = Path(out)
    state = export_official(model)
    notes = [n for n in [_position_note(model, fmt)] if n]
    if fmt is not WeightFormat.OFFICIAL:
        state = _complete_for_library(model, state)
    converted = adapter(fmt).from_official(state)
    params = sum(v.numel() for v in converted.values())
    hints = model_hints(model)
    if fmt is WeightFormat.HF:
        if (out.exists() and not out.is_dir()) or out.suffix in (".pth", ".pt", ".bin", ".safetensors"):
            raise CheckpointError(f"{out}: --format hf writes a folder (config.json + model.safetensors); give a folder name")
        config = hf_config_for(model)
        _check_hf_mlp(model, config)
        # Weights first, config last: a folder with a config.json is complete.
        write_safetensors(out / "model.safetensors", converted, hints_to_metadata(fmt.value, hints))
        atomic_write_text(out / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        return ExportResult(out, len(converted), params, notes)
    if is_safetensors(out):
        write_safetensors(out, converted, hints_to_metadata(fmt.value, hints))
        if fmt is WeightFormat.TIMM and model.num_heads != default_num_heads(model.embed_dim):
            notes.append(f"note: pass num_heads={model.num_heads} to timm.create_model")
    else:
        _refuse_unrecorded_heads(model, out, fmt)
        with atomic_open(out, "wb") as f:
            torch.save(converted, f)
    return ExportResult(out, len(converted), params, notes)


def _check_hf_mlp(model: DinoVisionTransformer, config: dict) -> None:
    """transformers derives the MLP width from mlp_ratio; refuse a width it cannot express."""
    block = model.blocks[0]
    dim = model.embed_dim
    hidden = int(dim * config["mlp_ratio"])
    if config["use_swiglu_ffn"]:
        want = block.mlp.w3.in_features
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    else:
        want = block.mlp.fc1.out_features
    if hidden != want:
        raise CheckpointError(
            f"transformers cannot express this model's MLP width {want} (mlp_ratio gives {hidden})"
        )
