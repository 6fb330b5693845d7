"""DINOv2 vision transformer backbone (official parameter layout, packed multi-crop forward).

``forward_features`` takes one image batch or a *list* of batches of different
resolutions (e.g. 2 global 224 crops and 8 local 98 crops per image).  A list
is packed: every group's tokens are concatenated into one ``[T, D]`` tensor so
norms, linear layers and MLPs run once over all crops, and attention stays
block-diagonal (see :mod:`dinov2.models.layers`).  Results equal running each
group on its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .drop_path import TokenLayout
from .layers import Block, FfnLayer, PatchEmbed, swiglu_hidden_features

# Official head counts for the released widths; other widths use 64-dim heads.
HEADS_BY_DIM = {384: 6, 768: 12, 1024: 16, 1536: 24}


def default_num_heads(embed_dim: int) -> int:
    return HEADS_BY_DIM.get(embed_dim, max(embed_dim // 64, 1))


POS_EMBED_INITS = ("trunc_normal", "sincos")


class ClsTokenInit(str, Enum):
    small_normal = "small_normal"  # DINOv2 reference: N(0, 1e-6) (registers always use it)
    trunc_normal = "trunc_normal"  # DINO reference: trunc-normal(0.02), like pos_embed


def sincos_pos_embed(grid: int, dim: int) -> Tensor:
    """2-D sin-cos position table ``[1, 1 + grid², dim]`` (zero row for CLS, then row-major patches).

    The first half of the channels encodes the patch row, the second half the column; each half is
    ``sin`` then ``cos`` of ``position * 10000^(-i / (dim/4))``, i = 0 … dim/4 - 1.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    parts = []
    for coord in (rows, cols):
        angles = coord.reshape(-1, 1) * freqs
        parts += [angles.sin(), angles.cos()]
    table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.cat(parts, dim=1)])
    return table.float().unsqueeze(0)


def interpolate_pos_embed(
    pos_embed: Tensor,
    grid_height: int,
    grid_width: int,
    antialias: bool,
    offset: float,
) -> Tensor:
    """Resize a square ``[1, 1 + M*M, D]`` position table to a ``grid_height x grid_width`` grid.

    Follows the official models exactly: fp32 bicubic; with ``offset > 0`` the
    resize is given as ``scale_factor = ((h + offset)/M, (w + offset)/M)``
    (DINO and DINOv2 without registers), otherwise as ``size=(h, w)`` (DINOv2
    with registers, antialiased).  The CLS entry is kept unchanged.  Returns
    ``pos_embed`` itself when the grid already matches, else a float32 table.
    """
    num_patches = pos_embed.shape[1] - 1
    side = round(math.sqrt(num_patches))
    if side * side != num_patches:
        raise ValueError(f"position table has {num_patches} patch entries, not a square grid")
    if grid_height == side and grid_width == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    cls_pos, patch_pos = table[:, :1], table[:, 1:]
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        scale = ((grid_height + offset) / side, (grid_width + offset) / side)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        patch_pos = F.interpolate(
            patch_pos, size=(grid_height, grid_width), mode="bicubic", antialias=antialias
        )
    if patch_pos.shape[-2:] != (grid_height, grid_width):
        raise RuntimeError(
            f"interpolated grid {tuple(patch_pos.shape[-2:])} != ({grid_height}, {grid_width})"
        )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_height * grid_width, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)  # fp32; the caller casts to the token dtype


class DinoVisionTransformer(nn.Module):
    """ViT backbone with CLS token, optional register tokens, LayerScale and a ``mask_token``.

    ``img_size`` is the image side the position grid is built for (518 → 37x37
    for patch 14); any input whose sides are multiples of ``patch_size`` works
    via interpolation.  ``ffn_hidden_features`` overrides the MLP inner width
    (otherwise ``embed_dim * mlp_ratio``, reduced by 2/3 for SwiGLU).
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        ffn_layer: FfnLayer | str = "mlp",
        ffn_hidden_features: int | None = None,
        init_values: float | None = 1e-5,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        block_chunks: int = 0,
        norm_eps: float = 1e-6,
        pos_embed_init: str = "trunc_normal",
        cls_token_init: ClsTokenInit | str = ClsTokenInit.small_normal,
    ) -> None:
        super().__init__()
        self.cls_token_init = ClsTokenInit(cls_token_init)
        if pos_embed_init not in POS_EMBED_INITS:
            raise ValueError(f"pos_embed_init must be one of {POS_EMBED_INITS}, got {pos_embed_init!r}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        if block_chunks:
            # Chunking only changes FSDP wrapping granularity in the reference code; here FSDP
            # wraps each block, and the state dict always uses flat ``blocks.N`` keys.
            raise ValueError(
                "block_chunks > 0 is not supported: blocks are kept flat (FSDP wraps each block)"
            )
        if ffn_layer == "swiglu":
            ffn_layer = "swiglufused"  # same math; only the fused layout exists here
        num_heads = num_heads or default_num_heads(embed_dim)
        if ffn_hidden_features is None:
            ffn_hidden_features = int(embed_dim * mlp_ratio)
            if ffn_layer == "swiglufused":
                ffn_hidden_features = swiglu_hidden_features(ffn_hidden_features)

        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = self.num_features = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.init_values = init_values
        self.pos_embed_init = pos_embed_init
        grid = img_size // patch_size

        # Registration order matches the official state-dict order.
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            # Linear ramp 0 → rate over depth (python floats: also works under torch.device("meta")).
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                ffn_hidden_features,
                ffn_layer=ffn_layer,  # type: ignore[arg-type]
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                init_values=init_values,
                drop_path=rate,
                norm_eps=norm_eps,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Reference init: trunc-normal(0.02) for Linear and pos_embed, N(0, 1e-6) CLS/registers.

        ``pos_embed_init="sincos"`` starts the (still learned) position table from fixed 2-D sin-cos
        values instead, as MoCo v3 and MAE do: entries of magnitude ~0.7, comparable to the patch
        embeddings, so attention can become position-dependent within a few steps.
        """
        if self.pos_embed_init == "sincos":
            grid = int(round((self.pos_embed.shape[1] - 1) ** 0.5))
            self.pos_embed.copy_(sincos_pos_embed(grid, self.embed_dim))
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token_init is ClsTokenInit.trunc_normal:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        else:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Position table for an image of ``height x width`` pixels, in ``x``'s dtype.

        (Positional order matches the official ``interpolate_pos_encoding(x, w, h)``,
        whose ``w`` is in fact the size of dim 2, i.e. the height.)
        """
        table = interpolate_pos_embed(
            self.pos_embed,
            height // self.patch_size,
            width // self.patch_size,
            antialias=self.interpolate_antialias,
            offset=self.interpolate_offset,
        )
        return table.to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images ``[B, 3, H, W]`` → tokens ``[B, 1 + R + N, D]`` (CLS, registers, patches)."""
        batch, _, height, width = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.dim() == 3:  # [B, h, w] patch grid → [B, h*w]
                masks = masks.flatten(1)
            if masks.dtype != torch.bool:
                masks = masks.bool()
            if masks.shape != tokens.shape[:2]:
                raise ValueError(
                    f"masks shape {tuple(masks.shape)} does not match the patch grid {tuple(tokens.shape[:2])}"
                )
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(tokens, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def _pack(self, images: Sequence[Tensor], masks: Sequence[Tensor | None]) -> tuple[Tensor, TokenLayout]:
        groups = [self.prepare_tokens_with_masks(x, m) for x, m in zip(images, masks)]
        layout = TokenLayout(tuple((g.shape[0], g.shape[1]) for g in groups))
        flat = [g.reshape(-1, g.shape[-1]) for g in groups]
        return (flat[0] if len(flat) == 1 else torch.cat(flat)), layout

    def _features_dict(
        self, prenorm: Tensor, normed: Tensor, masks: Tensor | None
    ) -> dict[str, Tensor | None]:
        registers_end = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:registers_end],
            "x_norm_patchtokens": normed[:, registers_end:],
            "x_prenorm": prenorm,
            "masks": masks,
        }

    # --------------------------------------------------------------- forward
    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Backbone features; a list of image batches gives a list of dicts (packed forward)."""
        if isinstance(x, Tensor):
            return self._forward_features_list([x], [masks])[0]  # type: ignore[list-item]
        images = list(x)
        if not images:
            raise ValueError("forward_features got an empty list of image batches")
        if isinstance(masks, Tensor):
            raise TypeError(
                "with a list of image batches, pass masks as a list (one entry or None per batch)"
            )
        masks_list = [None] * len(images) if masks is None else list(masks)  # type: ignore[arg-type]
        if len(masks_list) != len(images):
            raise ValueError(f"got {len(images)} image batches but {len(masks_list)} masks")
        return self._forward_features_list(images, masks_list)

    def _forward_features_list(
        self, images: list[Tensor], masks: list[Tensor | None]
    ) -> list[dict[str, Tensor | None]]:
        tokens, layout = self._pack(images, masks)
        for block in self.blocks:
            tokens = block(tokens, layout)
        normed = self.norm(tokens)
        outputs = []
        counts = layout.group_token_counts
        for prenorm, norm_out, (batch, seq_len), group_masks in zip(
            tokens.split(counts), normed.split(counts), layout.groups, masks
        ):
            outputs.append(
                self._features_dict(
                    prenorm.view(batch, seq_len, -1), norm_out.view(batch, seq_len, -1), group_masks
                )
            )
        return outputs

    def forward(
        self,
        x: Tensor | Sequence[Tensor],
        masks: Tensor | Sequence[Tensor | None] | None = None,
        is_training: bool = False,
    ):
        """``is_training``: the features dict(s); otherwise ``head(x_norm_clstoken)`` (CLS features)."""
        features = self.forward_features(x, masks)
        if is_training:
            return features
        if isinstance(features, list):
            return [self.head(f["x_norm_clstoken"]) for f in features]
        return self.head(features["x_norm_clstoken"])

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (int) or of the blocks at indices ``n`` (list).

        Each output is ``[B, N, D]`` patch tokens (``[B, D, h, w]`` with ``reshape``),
        paired with its CLS token when ``return_class_token``.
        """
        depth = len(self.blocks)
        if isinstance(n, int):
            if not 1 <= n <= depth:
                raise ValueError(f"n={n} is outside 1..{depth}")
            wanted = list(range(depth - n, depth))
        else:
            wanted = [int(i) for i in n]
            bad = [i for i in wanted if not 0 <= i < depth]
            if bad:
                raise ValueError(f"block indices {bad} are outside 0..{depth - 1}")
        wanted_set = set(wanted)
        batch, _, height, width = x.shape
        tokens = self.prepare_tokens_with_masks(x)
        seq_len = tokens.shape[1]
        layout = TokenLayout.single(batch, seq_len)
        flat = tokens.reshape(batch * seq_len, -1)
        taken: dict[int, Tensor] = {}
        for index, block in enumerate(self.blocks[: max(wanted) + 1]):
            flat = block(flat, layout)
            if index in wanted_set:
                taken[index] = flat.view(batch, seq_len, -1)
        outputs = [taken[i] for i in sorted(wanted_set)]
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            grid_h, grid_w = height // self.patch_size, width // self.patch_size
            outputs = [
                out.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)


# ---------------------------------------------------------------- builders
# Each builder fixes the published width/depth/heads; keyword arguments may still override them
# (e.g. ``vit_tiny(depth=2)`` for quick CPU runs).
def vit_tiny(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-Ti: dim 192, depth 12, 3 heads (for small CPU runs)."""
    return DinoVisionTransformer(
        patch_size=patch_size, **({"embed_dim": 192, "depth": 12, "num_heads": 3} | kwargs)
    )


def vit_small(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-S: dim 384, depth 12, 6 heads."""
    return DinoVisionTransformer(
        patch_size=patch_size, **({"embed_dim": 384, "depth": 12, "num_heads": 6} | kwargs)
    )


def vit_base(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-B: dim 768, depth 12, 12 heads."""
    return DinoVisionTransformer(
        patch_size=patch_size, **({"embed_dim": 768, "depth": 12, "num_heads": 12} | kwargs)
    )


def vit_large(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-L: dim 1024, depth 24, 16 heads."""
    return DinoVisionTransformer(
        patch_size=patch_size, **({"embed_dim": 1024, "depth": 24, "num_heads": 16} | kwargs)
    )


def vit_giant2(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-g/14 of DINOv2: dim 1536, depth 40, 24 heads, fused SwiGLU (inner width 4096)."""
    kwargs.setdefault("ffn_layer", "swiglufused")
    return DinoVisionTransformer(
        patch_size=patch_size, **({"embed_dim": 1536, "depth": 40, "num_heads": 24} | kwargs)
    )


ARCHITECTURES = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}


def build_model(arch: str, **kwargs) -> DinoVisionTransformer:
    """Build ``arch`` (one of :data:`ARCHITECTURES`) with constructor overrides ``kwargs``."""
    try:
        builder = ARCHITECTURES[arch]
    except KeyError:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHITECTURES)}") from None
    return builder(**kwargs)
