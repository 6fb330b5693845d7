"""Non-finite steps, detected on the device and reported at the next sync.

Every step folds ``isfinite`` of its loss terms and gradient norms into a device tensor and hands
the fused AdamW kernel a ``found_inf`` flag, so a non-finite step leaves the weights and the
optimizer state untouched without the host waiting for the device.  The trainer reads the flag at
its next log / checkpoint step (where it synchronises anyway) and stops there, before any save.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch


class NonFiniteLossError(RuntimeError):
    """The loss, a gradient norm or the state to save became NaN/inf: training stops (exit code 3)."""


class StepGuard:
    """Sticky device-side record of the first non-finite step since the last :meth:`reset`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0: none (steps count from 1)
        # What fused AdamW reads: 1.0 skips the update (and un-counts its step) on the device.
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)

    def check(self, step: int, values: Iterable[torch.Tensor]) -> torch.Tensor:
        """``step`` (1-based) is finite iff every value is; returns the device bool."""
        ok = torch.stack([v.detach().float().reshape(()) for v in values]).isfinite().all()
        self.found_inf.copy_((~ok).float())
        self.first_bad.copy_(torch.where(ok | (self.first_bad > 0), self.first_bad, step))
        return ok

    def reset(self) -> None:
        self.first_bad.zero_()
        self.found_inf.zero_()


def tensors_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Device bool: every tensor is finite.  A norm that overflows fp32 (an exploded state, |x|
    around 1e19 and up) counts as non-finite too, which is intended."""
    flat = [t.detach() for t in tensors if t.is_floating_point() and t.numel() > 0]
    if not flat:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(flat)
    return torch.stack([n.float() for n in norms]).isfinite().all()
