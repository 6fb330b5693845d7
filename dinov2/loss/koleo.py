"""KoLeo regulariser: spread features uniformly by pushing up nearest-neighbour distances."""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KoLeoLoss"]

logger = logging.getLogger(__name__)


class KoLeoLoss(nn.Module):
    """``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` on L2-normalised features.

    ``forward(features [B, D], n_chunks=1)`` splits the batch into ``n_chunks`` equal
    chunks (the trainer passes one chunk per global crop so neighbours come from the
    same crop) and returns the **sum** over chunks, as the DINOv2 reference does;
    the trainer applies the 0.1 weight.  Always computed in fp32, outside autocast.

    Two guards keep the loss and its gradient finite where the plain formula is not:
    * exact duplicates (distance 0): the distance is ``sqrt(|d|^2 + eps^2)``, whose
      gradient is 0 (not NaN) at 0, and ``eps`` inside the log bounds the value;
    * a chunk with fewer than 2 rows has no neighbour: it contributes 0.
    Each guard warns once per instance (``warnings.warn`` + logger) and is counted in
    ``guard_counts`` so the trainer can report how often it fires.  With ``lazy_guards`` the
    duplicate test stays on the device (no host sync per step): it is counted there and reported
    (warned) when ``guard_counts`` is read, which the trainer does only at its log steps.
    """

    def __init__(self, eps: float = 1e-8, lazy_guards: bool = False) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"KoLeoLoss: eps must be > 0, got {eps}")
        self.eps = eps
        self.lazy_guards = lazy_guards
        self._counts: dict[str, int] = {"duplicates": 0, "batch_lt_2": 0}
        self._pending_duplicates: torch.Tensor | None = None  # device-side count (lazy_guards)
        self._warned: set[str] = set()

    @property
    def guard_counts(self) -> dict[str, int]:
        if self._pending_duplicates is not None:
            n, self._pending_duplicates = int(self._pending_duplicates), None
            if n:
                self._guard("duplicates", "exact duplicate features (nearest-neighbour distance 0)", n)
        return dict(self._counts)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def _guard(self, kind: str, message: str, n: int = 1) -> None:
        self._counts[kind] += n
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("KoLeoLoss guard: %s", message)
            warnings.warn(f"KoLeoLoss guard: {message}", RuntimeWarning, stacklevel=3)

    def forward(self, features: torch.Tensor, n_chunks: int = 1) -> torch.Tensor:
        if features.dim() != 2:
            raise ValueError(f"KoLeoLoss: features must be 2-D [B, D], got shape {tuple(features.shape)}")
        if n_chunks <= 0 or features.shape[0] % n_chunks:
            raise ValueError(f"KoLeoLoss: batch of {features.shape[0]} rows does not split into {n_chunks} chunks")
        device_type = features.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = features.float()
            return sum((self._chunk_loss(c) for c in x.chunk(n_chunks)), x.new_zeros(()))

    def _chunk_loss(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < 2:
            self._guard("batch_lt_2", f"a chunk has {n} row(s), so no nearest neighbour: contributing 0")
            return x.sum() * 0.0  # keeps the graph so backward still works
        x = F.normalize(x, p=2, dim=-1, eps=self.eps)
        with torch.no_grad():
            # Nearest neighbour by cosine (features are unit norm); the diagonal is excluded.
            sims = x @ x.t()
            sims.fill_diagonal_(float("-inf"))
            nn_index = sims.argmax(dim=1)
        diff = x - x[nn_index]
        sq_dist = diff.pow(2).sum(dim=-1)
        duplicates = (sq_dist == 0).any()
        if self.lazy_guards:
            pending = self._pending_duplicates
            self._pending_duplicates = duplicates.long() if pending is None else pending + duplicates
        elif bool(duplicates):
            self._guard("duplicates", "exact duplicate features (nearest-neighbour distance 0)")
        dist = torch.sqrt(sq_dist + self.eps**2)
        return -torch.log(dist + self.eps).mean()
