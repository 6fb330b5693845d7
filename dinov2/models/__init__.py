"""ViT backbones of DINO / DINOv2 (official parameter layout) and checkpoint loading."""

from .checkpoint import CheckpointError, export_official, infer_architecture, load_pretrained, save_official
from .drop_path import DropPath, TokenLayout
from .layers import XFORMERS_AVAILABLE, attention_backend
from .vit import (
    ARCHITECTURES,
    DinoVisionTransformer,
    build_model,
    interpolate_pos_embed,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHITECTURES",
    "XFORMERS_AVAILABLE",
    "CheckpointError",
    "DinoVisionTransformer",
    "DropPath",
    "TokenLayout",
    "attention_backend",
    "build_model",
    "export_official",
    "infer_architecture",
    "interpolate_pos_embed",
    "load_pretrained",
    "save_official",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
