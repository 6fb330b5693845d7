"""iBOT masked-patch loss: student patch logits vs teacher patch targets on masked patches."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["iBOTPatchLoss", "masked_patch_weights"]


def masked_patch_weights(masks: torch.Tensor) -> torch.Tensor:
    """Per-masked-patch weights ``1 / (#masked patches in its image)``.

    ``masks`` is a boolean ``[n_images, n_patches]`` tensor; the result has one entry
    per ``True`` in row-major order, i.e. the order of ``patch_tokens[masks]``.
    The weights of each masked image sum to 1.
    """
    if masks.dim() != 2 or masks.dtype != torch.bool:
        raise ValueError(f"masked_patch_weights: masks must be a 2-D bool tensor, got {masks.dtype} {tuple(masks.shape)}")
    per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
    return per_image.expand_as(masks)[masks]


class iBOTPatchLoss(nn.Module):
    """``-sum_p w_p sum_k t_p[k] log softmax(s_p / student_temp)[k] / n_images``.

    Inputs hold only the masked patches (``M`` rows gathered with the boolean mask):
    student logits ``[M, K]``, teacher probabilities ``[M, K]`` and per-patch weights
    ``[M]`` (normally :func:`masked_patch_weights`), so each masked image contributes
    the mean loss over its masked patches.  Computed in fp32.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"iBOTPatchLoss: student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"

    def forward(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        weights: torch.Tensor,
        n_images: int | torch.Tensor | None = None,
        n_masked_patches: int | None = None,
    ) -> torch.Tensor:
        """Weighted masked-patch cross-entropy.

        ``n_images`` is the divisor.  Default: the number of masked images (the sum of
        the weights, since each masked image's weights sum to 1).  The DINOv2
        reference divides by the number of rows of its mask tensor, i.e. *all* global
        crop images, masked or not: pass ``n_images=masks.shape[0]`` to reproduce it
        (``forward_masked`` does).  ``n_masked_patches`` keeps only the first rows of
        the logits/probs (for callers that pad the gathered patches to a fixed size).
        """
        s, t = student_patch_logits, teacher_patch_probs
        if s.dim() != 2 or t.dim() != 2 or s.shape[1] != t.shape[1]:
            raise ValueError(
                f"iBOTPatchLoss: student {tuple(s.shape)} and teacher {tuple(t.shape)} must be [M, K] with equal K"
            )
        if n_masked_patches is not None:
            s, t = s[:n_masked_patches], t[:n_masked_patches]
        if s.shape[0] != t.shape[0] or weights.dim() != 1 or weights.shape[0] != s.shape[0]:
            raise ValueError(
                f"iBOTPatchLoss: {s.shape[0]} student rows, {t.shape[0]} teacher rows and "
                f"{tuple(weights.shape)} weights must all match"
            )
        w = weights.detach().float()
        if n_images is None:
            divisor = w.sum().round().clamp_min(1.0)  # = number of masked images
        elif isinstance(n_images, torch.Tensor):
            divisor = n_images.float()
        else:
            if n_images <= 0:
                raise ValueError(f"iBOTPatchLoss: n_images must be > 0, got {n_images}")
            divisor = float(n_images)
        if s.shape[0] == 0:  # nothing masked this step: zero loss that still backpropagates
            return student_patch_logits.float().sum() * 0.0
        log_probs = F.log_softmax(s.float() * (1.0 / self.student_temp), dim=-1)  # mul: cheaper than div
        per_patch = -(t.detach().float() * log_probs).sum(dim=-1)
        return (per_patch * w).sum() / divisor

    def forward_masked(
        self,
        student_patch_logits: torch.Tensor,
        teacher_patch_probs: torch.Tensor,
        masks: torch.Tensor,
        n_masked_patches: int | None = None,
    ) -> torch.Tensor:
        """Reference-compatible form: weights from ``masks`` and divisor ``masks.shape[0]``."""
        return self.forward(
            student_patch_logits,
            teacher_patch_probs,
            masked_patch_weights(masks),
            n_images=masks.shape[0],
            n_masked_patches=n_masked_patches,
        )
