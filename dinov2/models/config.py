"""The backbone's configuration section and the one function that builds a backbone from it.

The model's config lives with the model (per-component configs): the trainer's root config composes
it, and code below the trainer (``load_pretrained`` reading a run folder's ``config.yaml``) can
rebuild a run's exact backbone without importing the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from dinov2.models.vit import ARCHITECTURES, POS_EMBED_INITS, ClsTokenInit, DinoVisionTransformer, build_model


@dataclass
class ModelConfig:
    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base | vit_large | vit_giant2
    patch_size: int = 14
    img_size: int = 0  # position grid size; 0 → the global crop size
    # 0 / "" keep the arch's value (lets tiny configs shrink a named arch)
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    ffn_layer: str = ""  # "" → arch default; mlp | swiglufused
    layerscale: Optional[float] = 1.0e-5  # null → no LayerScale (original DINO)
    num_register_tokens: int = 0
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    # trunc_normal (reference, std 0.02) | sincos (2-D sin-cos start, still learned; MoCo v3 / MAE).
    # Only the initial values differ: checkpoints keep the official layout either way.
    pos_embed_init: str = "trunc_normal"
    cls_token_init: ClsTokenInit = ClsTokenInit.small_normal  # small_normal (DINOv2) | trunc_normal (DINO)
    # Initialise the student (and teacher) backbone from a checkpoint (ours or official layout).
    pretrained: str = ""

    def errors(self) -> list[str]:
        err = []
        if self.pos_embed_init not in POS_EMBED_INITS:
            err.append(f"model.pos_embed_init must be one of {'|'.join(POS_EMBED_INITS)}, "
                       f"got {self.pos_embed_init!r}")
        if self.patch_size <= 0:
            err.append("model.patch_size must be > 0")
        return err


def build_backbone(cfg: ModelConfig, img_size: int, drop_path_rate: float) -> DinoVisionTransformer:
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch {cfg.arch!r} is not one of {sorted(ARCHITECTURES)}")
    kwargs: dict[str, Any] = dict(
        img_size=cfg.img_size or img_size,
        init_values=cfg.layerscale,
        num_register_tokens=cfg.num_register_tokens,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=cfg.drop_path_uniform,
        pos_embed_init=cfg.pos_embed_init,
        cls_token_init=cfg.cls_token_init,
    )
    if cfg.ffn_layer:
        kwargs["ffn_layer"] = cfg.ffn_layer
    if cfg.embed_dim or cfg.depth or cfg.num_heads:
        # Shrunk/widened variant of a named arch: start from the arch's shape, override fields.
        shape = _ARCH_SHAPES[cfg.arch]
        embed_dim = cfg.embed_dim or shape[0]
        kwargs.update(
            embed_dim=embed_dim,
            depth=cfg.depth or shape[1],
            num_heads=cfg.num_heads or (shape[2] if not cfg.embed_dim else max(1, embed_dim // 64)),
        )
        if cfg.arch == "vit_giant2" and "ffn_layer" not in kwargs:
            kwargs["ffn_layer"] = "swiglufused"
        return DinoVisionTransformer(patch_size=cfg.patch_size, **kwargs)
    return build_model(cfg.arch, patch_size=cfg.patch_size, **kwargs)


# (embed_dim, depth, heads) of the named architectures
_ARCH_SHAPES = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}
