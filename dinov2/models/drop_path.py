"""Stochastic depth for residual branches, including DINOv2's "efficient" subset form.

Tokens travel through the backbone as one flat ``[T, D]`` tensor plus a
:class:`TokenLayout` that says how the rows split into crop groups of
``batch x seq_len`` tokens (several groups when crops of different resolutions
are packed into one forward).  Both drop-path forms here work per sample and,
with packing, per crop group.

* ``rate <= 0.1``: ordinary per-sample DropPath: the branch runs on every
  sample; whole samples of its output are zeroed and the rest scaled by
  ``1 / (1 - rate)``.
* ``rate > 0.1`` (DINOv2 uses 0.3-0.4): the branch runs *only* on a random
  subset of ``max(floor(B * (1 - rate)), 1)`` samples per group and its output
  is added back with ``index_add`` scaled by ``B / kept``, so the dropped
  samples cost no compute at all.  The expectation equals the plain residual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Above this rate the subset form pays off (DINOv2 uses the same threshold).
EFFICIENT_DROP_PATH_THRESHOLD = 0.1


@dataclass(frozen=True)
class TokenLayout:
    """How the rows of a flat ``[T, D]`` token tensor split into ``(batch, seq_len)`` groups."""

    groups: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.groups:
            raise ValueError("TokenLayout needs at least one (batch, seq_len) group")
        for batch, seq_len in self.groups:
            if batch < 1 or seq_len < 1:
                raise ValueError(f"TokenLayout group sizes must be positive, got {self.groups}")

    @classmethod
    def single(cls, batch: int, seq_len: int) -> TokenLayout:
        return cls(((int(batch), int(seq_len)),))

    @property
    def num_tokens(self) -> int:
        return sum(b * n for b, n in self.groups)

    @property
    def group_token_counts(self) -> list[int]:
        return [b * n for b, n in self.groups]

    @property
    def seqlens(self) -> list[int]:
        """Length of every individual sequence, in row order (for block-diagonal attention)."""
        return [n for b, n in self.groups for _ in range(b)]


def drop_path(x: Tensor, rate: float, layout: TokenLayout, training: bool) -> Tensor:
    """Per-sample DropPath on a flat ``[T, D]`` branch output laid out as ``layout``."""
    if rate <= 0.0 or not training:
        return x
    keep = 1.0 - rate
    row_masks = []
    for batch, seq_len in layout.groups:
        sample_mask = torch.empty(batch, device=x.device, dtype=x.dtype).bernoulli_(keep).div_(keep)
        row_masks.append(sample_mask.repeat_interleave(seq_len))
    mask = row_masks[0] if len(row_masks) == 1 else torch.cat(row_masks)
    return x * mask.unsqueeze(-1)


class DropPath(nn.Module):
    """Module form of :func:`drop_path` (active only in training mode)."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        return drop_path(x, self.rate, layout, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def subset_rows(
    layout: TokenLayout, rate: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[Tensor, TokenLayout, Tensor]:
    """Pick the samples a residual branch is computed on, per crop group.

    Returns ``(rows, sub_layout, row_scale)``: the flat row indices of the kept
    samples' tokens (group by group, so they form a valid layout), the layout of
    that subset, and the per-row factor ``B / kept`` of each row's group.
    """
    rows, sub_groups, scales = [], [], []
    offset = 0
    for batch, seq_len in layout.groups:
        kept = max(int(batch * (1.0 - rate)), 1)
        samples = torch.randperm(batch, device=device, generator=generator)[:kept]
        tokens = torch.arange(seq_len, device=device)
        rows.append((offset + samples.unsqueeze(1) * seq_len + tokens.unsqueeze(0)).reshape(-1))
        sub_groups.append((kept, seq_len))
        scales.append(torch.full((kept * seq_len,), batch / kept, device=device))
        offset += batch * seq_len
    return torch.cat(rows), TokenLayout(tuple(sub_groups)), torch.cat(scales)


def drop_add_residual_subset(
    x: Tensor,
    layout: TokenLayout,
    residual_fn: Callable[[Tensor, TokenLayout], Tensor],
    rate: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``x + residual_fn(x)`` in expectation, computing the branch on a sample subset only.

    ``residual_fn(tokens, layout)`` maps a flat token tensor with its layout to a
    tensor of the same shape; it sees only the kept samples' rows.
    """
    rows, sub_layout, row_scale = subset_rows(layout, rate, x.device, generator)
    residual = residual_fn(x.index_select(0, rows), sub_layout)
    residual = residual * row_scale.to(residual.dtype).unsqueeze(-1)
    return torch.index_add(x, 0, rows, residual.to(x.dtype))


def residual_with_drop_path(
    x: Tensor,
    layout: TokenLayout,
    residual_fn: Callable[[Tensor, TokenLayout], Tensor],
    rate: float,
    training: bool,
) -> Tensor:
    """``x + branch(x)`` with the stochastic-depth form chosen by ``rate`` (see module doc)."""
    if training and rate > EFFICIENT_DROP_PATH_THRESHOLD:
        return drop_add_residual_subset(x, layout, residual_fn, rate)
    if training and rate > 0.0:
        return x + drop_path(residual_fn(x, layout), rate, layout, training=True)
    return x + residual_fn(x, layout)
