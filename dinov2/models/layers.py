"""Building blocks of the ViT backbone (parameter names follow the official DINOv2 layout).

Tokens move through blocks as one flat ``[T, D]`` tensor plus a
:class:`~dinov2.models.drop_path.TokenLayout`; linear layers, norms and MLPs
work on all rows at once, and only attention looks at the layout:

* CUDA + xformers importable: one ``memory_efficient_attention`` call with a
  ``BlockDiagonalMask`` over every sequence of every crop group;
* otherwise: PyTorch ``scaled_dot_product_attention`` once per equal-length
  crop group (batched, no mask), which on CPU is ~2.8x faster fwd+bwd than a
  dense block-diagonal boolean mask (see bench/RESULTS.md).
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .drop_path import TokenLayout, residual_with_drop_path

try:  # xformers is an optional GPU extra; its kernels only run on CUDA.
    from xformers.ops import fmha as _xformers_fmha
    from xformers.ops import memory_efficient_attention as _xformers_attention

    XFORMERS_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the environment
    _xformers_fmha = None
    _xformers_attention = None
    XFORMERS_AVAILABLE = False

AttentionBackend = Literal["xformers", "sdpa"]


def attention_backend(device: torch.device | str) -> AttentionBackend:
    """The attention implementation used for tensors on ``device``.

    ``DINOV2_DISABLE_XFORMERS=1`` forces SDPA (useful to compare backends on a GPU).
    """
    device = torch.device(device)
    if XFORMERS_AVAILABLE and device.type == "cuda" and os.environ.get("DINOV2_DISABLE_XFORMERS") != "1":
        return "xformers"
    return "sdpa"


_BLOCK_DIAGONAL_MASKS: dict[tuple[int, ...], object] = {}


def _block_diagonal_mask(layout: TokenLayout) -> object:
    # Building the mask is pure Python bookkeeping; cache it per layout (layouts repeat every step).
    key = tuple(layout.seqlens)
    mask = _BLOCK_DIAGONAL_MASKS.get(key)
    if mask is None:
        mask = _xformers_fmha.BlockDiagonalMask.from_seqlens(list(key))
        if len(_BLOCK_DIAGONAL_MASKS) > 64:
            _BLOCK_DIAGONAL_MASKS.clear()
        _BLOCK_DIAGONAL_MASKS[key] = mask
    return mask


class Attention(nn.Module):
    """Multi-head self-attention over every sequence of a (possibly packed) token layout."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """``x``: ``[B, N, D]`` (one group) or flat ``[T, D]`` with its ``layout``."""
        if x.dim() == 3:
            batch, seq_len, dim = x.shape
            out = self._attend(x.reshape(batch * seq_len, dim), TokenLayout.single(batch, seq_len))
            return out.reshape(batch, seq_len, dim)
        if layout is None:
            raise ValueError("a flat [T, D] token tensor needs its TokenLayout")
        return self._attend(x, layout)

    def _attend(self, x: Tensor, layout: TokenLayout) -> Tensor:
        if x.shape[0] != layout.num_tokens:
            raise ValueError(
                f"token tensor has {x.shape[0]} rows but the layout describes {layout.num_tokens}"
            )
        qkv = self.qkv(x)
        if attention_backend(x.device) == "xformers":
            out = self._attend_xformers(qkv, layout)
        else:
            out = self._attend_sdpa(qkv, layout)
        return self.proj(out)

    def _attend_sdpa(self, qkv: Tensor, layout: TokenLayout) -> Tensor:
        heads, head_dim = self.num_heads, self.head_dim
        outputs = []
        for group_qkv, (batch, seq_len) in zip(qkv.split(layout.group_token_counts), layout.groups):
            # Unbind the "3" axis, then transpose (same q/k/v strides as permute + unbind(0)): backward
            # stacks the three gradients straight into the [B, N, 3, H, hd] qkv layout, where unbinding a
            # permuted view costs one more full-size copy (the permute's contiguous gradient).
            q, k, v = (t.transpose(1, 2) for t in group_qkv.view(batch, seq_len, 3, heads, head_dim).unbind(2))
            out = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
            outputs.append(out.transpose(1, 2).reshape(batch * seq_len, heads * head_dim))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _attend_xformers(self, qkv: Tensor, layout: TokenLayout) -> Tensor:  # pragma: no cover - CUDA only
        heads, head_dim = self.num_heads, self.head_dim
        if len(layout.groups) == 1:
            batch, seq_len = layout.groups[0]
            q, k, v = qkv.view(batch, seq_len, 3, heads, head_dim).unbind(2)
            out = _xformers_attention(q, k, v)
        else:
            q, k, v = qkv.view(1, layout.num_tokens, 3, heads, head_dim).unbind(2)
            out = _xformers_attention(q, k, v, attn_bias=_block_diagonal_mask(layout))
        return out.reshape(layout.num_tokens, heads * head_dim)


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` (ViT MLP)."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_features(mlp_hidden_features: int) -> int:
    """Inner width of DINOv2's fused SwiGLU for a nominal MLP width (2/3, rounded up to 8)."""
    return (int(mlp_hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(nn.Module):
    """SwiGLU FFN with the gate and value projections fused in ``w12`` (official layout).

    ``hidden_features`` is the inner width itself (4096 for ViT-g/14); use
    :func:`swiglu_hidden_features` to derive it from a nominal MLP width.
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    """Per-channel residual-branch scale ``x * gamma`` (CaiT), initialised to ``init_values``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_values))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches projected by a strided conv: ``[B,3,H,W] -> [B,N,D]``."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


FfnLayer = Literal["mlp", "swiglufused"]


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale and (efficient) stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        ffn_hidden_features: int,
        ffn_layer: FfnLayer = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {drop_path}")
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, ffn_hidden_features, bias=ffn_bias)
        elif ffn_layer == "swiglufused":
            self.mlp = SwiGLUFFNFused(dim, ffn_hidden_features, bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r} (expected 'mlp' or 'swiglufused')")
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path_rate = float(drop_path)

    def attn_residual(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.ls1(self.attn(self.norm1(x), layout))

    def ffn_residual(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, layout: TokenLayout | None = None) -> Tensor:
        """``x``: ``[B, N, D]`` or flat ``[T, D]`` with its ``layout``; returns the same shape."""
        if x.dim() == 3:
            batch, seq_len, dim = x.shape
            out = self.forward(x.reshape(batch * seq_len, dim), TokenLayout.single(batch, seq_len))
            return out.reshape(batch, seq_len, dim)
        if layout is None:
            raise ValueError("a flat [T, D] token tensor needs its TokenLayout")
        x = residual_with_drop_path(x, layout, self.attn_residual, self.drop_path_rate, self.training)
        x = residual_with_drop_path(x, layout, self.ffn_residual, self.drop_path_rate, self.training)
        return x
