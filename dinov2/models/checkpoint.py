"""Load any DINO / DINOv2 ViT backbone checkpoint without knowing its architecture; export it back.

:func:`load_pretrained` reads a file (``torch.load(weights_only=True)``) or takes a
state dict, unwraps training-checkpoint wrappers, infers the architecture from
key names and tensor shapes, and loads with strict key and shape checks.
Understood layouts:

* official DINOv2 backbones ``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``
  (flat ``blocks.N.*``, LayerScale ``ls1.gamma``, ``mlp.fc1/fc2`` or fused
  SwiGLU ``mlp.w12/w3``, 37x37 position grid, optional ``register_tokens``);
* original DINO (2021) backbones ``dino_deitsmall16_pretrain.pth`` … (no
  LayerScale, no ``mask_token``, 224 grid, patch 16 or 8);
* training checkpoints: a top-level ``teacher`` / ``model`` / ``state_dict`` /
  ``student`` dict, ``teacher.`` / ``student.`` / ``backbone.`` / ``module.`` /
  ``_orig_mod.`` prefixes (heads are ignored), chunked ``blocks.<chunk>.<i>``.

Beyond ``torch.save`` files it reads ``.safetensors`` files, Hugging Face folders
(``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) and run / checkpoint folders; the
key layout (official, HF, timm) is detected and converted by the adapters in :mod:`.formats`.

:func:`export_official` writes the official flat layout back (same key names,
order and shapes as the released files).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.io import atomic_path
from .formats import KeyMapError, adapter, detect_format
from .formats.files import (
    WeightsFileError,
    is_hf_folder,
    is_safetensors,
    metadata_to_hints,
    read_hf_folder,
    read_safetensors,
    read_torch_file,
)
from .formats.official import OFFICIAL_KEY as _OFFICIAL_KEY
from .run_folder import read_run_backbone
from .vit import DinoVisionTransformer, default_num_heads

# Wrapper keys of training checkpoints, in order of preference (the teacher is the model to evaluate).
WRAPPER_KEYS = ("teacher", "model", "state_dict", "student")
# Module-wrapper path segments added by DDP/FSDP/torch.compile/activation checkpointing.
WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_CHUNKED_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(\d+)\.")
class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not hold a ViT backbone we can build (message says why)."""


def _preview(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def read_checkpoint(path: str | Path) -> Any:
    """``torch.load`` a file safely (``weights_only=True``), turning failures into :class:`CheckpointError`."""
    try:
        return read_torch_file(path)
    except WeightsFileError as exc:
        raise CheckpointError(str(exc)) from exc


def _strip_segments(key: str) -> str:
    parts = [part for part in key.split(".") if part not in WRAPPER_SEGMENTS]
    return ".".join(parts)


def _select_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def normalize_state_dict(obj: Any) -> OrderedDict[str, Tensor]:
    """Unwrap a (training) checkpoint into a flat official-layout backbone state dict."""
    state = obj
    for _ in range(4):
        if not isinstance(state, Mapping):
            raise CheckpointError(
                f"not a state dict: expected a mapping of names to tensors, got {type(state).__name__}"
            )
        if any(isinstance(v, Tensor) for v in state.values()):
            break
        for wrapper in WRAPPER_KEYS:
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
        else:
            raise CheckpointError(
                "not a state dict: no tensors at the top level and no "
                f"{'/'.join(WRAPPER_KEYS)} entry; top-level keys: {_preview([str(k) for k in state])}"
            )
    else:
        raise CheckpointError("not a state dict: wrappers nested too deeply")

    flat: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"not a state dict: key {key!r} is not a string")
        flat[_strip_segments(key)] = value
    for prefix in ("teacher.", "student.", "backbone."):
        flat = _select_prefix(flat, prefix)

    if any(_CHUNKED_BLOCK_KEY.match(k) for k in flat):
        # Reference block chunking pads chunk c with Identity modules, so the inner index is global.
        unchunked: dict[str, Any] = {}
        for key, value in flat.items():
            new_key = _CHUNKED_BLOCK_KEY.sub(r"blocks.\2.", key)
            if new_key in unchunked:
                raise CheckpointError(f"chunked block keys collide after unchunking: {new_key!r}")
            unchunked[new_key] = value
        flat = unchunked

    not_tensors = [k for k, v in flat.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise CheckpointError(f"not a state dict: entries that are not tensors: {_preview(not_tensors)}")
    return OrderedDict(flat)


def infer_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor kwargs of :class:`DinoVisionTransformer` implied by the keys and shapes of ``state``."""
    required = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(
            f"not a ViT backbone state dict: missing {_preview(missing)}; it has {_preview(sorted(state))}"
        )
    proj = state["patch_embed.proj.weight"]
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2]:
        raise CheckpointError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}, expected [D, C, p, p]")
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[-1]

    pos_embed = state["pos_embed"]
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[-1] != embed_dim:
        raise CheckpointError(
            f"pos_embed has shape {tuple(pos_embed.shape)}, expected [1, 1 + M*M, {embed_dim}]"
        )
    num_patches = pos_embed.shape[1] - 1
    side = round(math.sqrt(max(num_patches, 0)))
    if num_patches < 1 or side * side != num_patches:
        raise CheckpointError(f"pos_embed has {num_patches} patch positions, which is not a square grid")

    block_ids = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    depth = block_ids[-1] + 1
    if block_ids != list(range(depth)):
        absent = sorted(set(range(depth)) - set(block_ids))
        raise CheckpointError(f"block indices are not contiguous: blocks {absent[:10]} are missing")

    if "blocks.0.mlp.fc1.weight" in state:
        ffn_layer, hidden = "mlp", state["blocks.0.mlp.fc1.weight"].shape[0]
    elif "blocks.0.mlp.w12.weight" in state:
        ffn_layer, hidden = "swiglufused", state["blocks.0.mlp.w12.weight"].shape[0] // 2
    else:
        raise CheckpointError(
            "cannot tell the MLP kind: neither blocks.0.mlp.fc1.weight nor blocks.0.mlp.w12.weight"
        )

    registers = state.get("register_tokens")
    num_register_tokens = int(registers.shape[1]) if registers is not None and registers.dim() == 3 else 0
    has_layerscale = "blocks.0.ls1.gamma" in state
    return {
        "img_size": side * patch_size,
        "patch_size": int(patch_size),
        "in_chans": int(in_chans),
        "embed_dim": int(embed_dim),
        "depth": depth,
        "num_heads": default_num_heads(int(embed_dim)),
        "ffn_layer": ffn_layer,
        "ffn_hidden_features": int(hidden),
        "qkv_bias": "blocks.0.attn.qkv.bias" in state,
        "proj_bias": "blocks.0.attn.proj.bias" in state,
        "ffn_bias": ("blocks.0.mlp.fc1.bias" if ffn_layer == "mlp" else "blocks.0.mlp.w12.bias") in state,
        # The value is irrelevant (gamma is loaded); None removes LayerScale (DINO 2021).
        "init_values": 1e-5 if has_layerscale else None,
        "num_register_tokens": num_register_tokens,
        # Register models resize with size= + antialias; the others (DINOv2 and DINO) with +0.1 offset.
        "interpolate_antialias": num_register_tokens > 0,
        "interpolate_offset": 0.0 if num_register_tokens > 0 else 0.1,
    }


def load_state_dict_strict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    allow_missing: tuple[str, ...] = (),
    assign: bool = False,
    source_key=None,
) -> None:
    """Load ``state`` into ``model`` after checking key sets and shapes; errors list every problem.

    ``assign`` adopts the tensors (cast to float32 where needed) instead of copying them;
    ``source_key`` maps an official key to the name it had in the file (for the messages).
    """
    name = source_key or (lambda key: key)
    expected = model.state_dict()
    missing = [name(k) for k in expected if k not in state and k not in allow_missing]
    unexpected = [name(k) for k in state if k not in expected]
    mismatched = [
        f"{name(k)}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_preview(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_preview(mismatched, limit=5)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))
    if assign:
        state = {
            k: v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
            for k, v in state.items()
        }
    model.load_state_dict(state, strict=False, assign=assign)


def read_weights(path: str | Path) -> tuple[Any, dict[str, Any], dict[str, Any], str | None]:
    """(raw state or checkpoint, constructor hints, values the shapes must agree with, layout or None).

    Hints are what the tensors cannot show (head count, position-resize mode, LayerNorm eps); they
    come from an HF ``config.json``, our safetensors metadata or a run folder's ``config.yaml``.
    """
    path = Path(path)
    if path.is_dir():
        if is_hf_folder(path):
            state, hints, expect = read_hf_folder(path)
            return state, hints, expect, "hf"
        state, hints = read_run_backbone(path)  # a run / checkpoint folder (DCP shards)
        return state, hints, {}, "official"
    if is_safetensors(path):
        state, metadata = read_safetensors(path)
        layout, hints = metadata_to_hints(metadata, str(path))
        return state, hints, {}, layout
    return read_checkpoint(path), {}, {}, None


def _check_expected(kwargs: Mapping[str, Any], expect: Mapping[str, Any]) -> None:
    wrong = [f"{k}: config {v} vs tensors {kwargs.get(k)}" for k, v in expect.items() if kwargs.get(k) != v]
    if wrong:
        raise CheckpointError("config.json does not match the tensors: " + "; ".join(wrong))


def load_pretrained(
    path_or_state_dict: str | Path | Mapping[str, Any], **overrides: Any
) -> DinoVisionTransformer:
    """Build the backbone a checkpoint holds and load its weights (strict keys and shapes).

    Accepts a ``.pth`` / ``.bin`` / ``.safetensors`` file, an HF folder, a run or checkpoint folder
    or a state dict, in the official, HF or timm layout.  ``overrides`` are constructor kwargs
    applied on top of the inferred ones (e.g. ``drop_path_rate=0.3``, or ``num_heads`` for a file
    that cannot record it); overriding a shape-defining value that does not fit the file raises
    :class:`CheckpointError`.  The model is returned in eval mode, float32, on the CPU.
    """
    source = path_or_state_dict
    from_file = isinstance(source, (str, Path))
    where = f"{source}: " if from_file else ""
    try:
        if from_file:
            raw, hints, expect, layout = read_weights(source)
        else:
            raw, hints, expect, layout = source, {}, {}, None
        state = normalize_state_dict(raw)
        layout_adapter = adapter(layout or detect_format(state))
        state, adapter_hints = layout_adapter.to_official(state)
        # What the file records beats the layout's defaults; the caller's overrides beat both.
        kwargs = {**infer_architecture(state), **adapter_hints, **hints, **overrides}
        _check_expected(kwargs, expect)
        # Build without initialising (meta), then allocate: init of ViT-g takes minutes on a CPU.
        try:
            with torch.device("meta"):
                model = DinoVisionTransformer(**kwargs)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot build the model {kwargs}: {exc}") from exc
        model = model.to_empty(device="cpu")
        # DINO (2021) backbones have no mask_token: keep the reference init (zeros).
        allow_missing = ("mask_token",) if "mask_token" not in state else ()
        # Tensors read from a file are ours: adopt them instead of copying (halves peak memory for
        # ViT-g); a caller's dict is copied so the model never aliases it.
        load_state_dict_strict(model, state, allow_missing, assign=from_file, source_key=layout_adapter.source_key)
        if allow_missing:
            with torch.no_grad():
                model.mask_token.zero_()
    except (CheckpointError, KeyMapError, WeightsFileError) as exc:
        raise CheckpointError(f"{where}{exc}") from exc
    return model.eval()


def export_official(model: nn.Module) -> OrderedDict[str, Tensor]:
    """The backbone's weights in the official flat layout (``dinov2_vit*14_pretrain.pth`` keys and order)."""
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        key = _strip_segments(key)
        if hasattr(value, "full_tensor"):  # FSDP2 DTensor shard → full tensor
            value = value.full_tensor()
        out[key] = value.detach().clone().contiguous().cpu()
    foreign = [k for k in out if not _OFFICIAL_KEY.match(k)]
    if foreign:
        raise CheckpointError(f"model has keys outside the official backbone layout: {_preview(foreign)}")
    return out


def save_official(model: nn.Module, path: str | Path) -> Path:
    """Write :func:`export_official` to ``path`` atomically (loadable by the official code).

    A ``.pth`` cannot record the head count: use :func:`dinov2.models.export.export_weights`
    (``.safetensors`` / HF), which refuses a ``.pth`` that would lose a non-default one.
    """
    path = Path(path)
    state = export_official(model)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path
