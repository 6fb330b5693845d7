"""DINO image-level loss: cross-entropy between teacher and student prototype scores."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOLoss", "dino_pair_count"]

TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def dino_pair_count(n_student_crops: int, n_teacher_crops: int, n_global_student_crops: int) -> int:
    """Number of (student crop, teacher crop) pairs once same-view pairs are removed."""
    return n_student_crops * n_teacher_crops - n_global_student_crops


def _as_chunks(x: TensorOrList, n_chunks: int | None, chunk_rows: int | None, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 2:
            raise ValueError(f"DINOLoss: {what} must be 2-D [crops*batch, K], got shape {tuple(x.shape)}")
        if n_chunks is not None:
            if n_chunks <= 0 or x.shape[0] % n_chunks:
                raise ValueError(f"DINOLoss: {what} has {x.shape[0]} rows, not divisible into {n_chunks} crops")
            return list(x.chunk(n_chunks))
        assert chunk_rows is not None
        if chunk_rows <= 0 or x.shape[0] % chunk_rows:
            raise ValueError(
                f"DINOLoss: {what} has {x.shape[0]} rows, not a multiple of the teacher batch size {chunk_rows}"
            )
        return list(x.split(chunk_rows))
    chunks = list(x)
    if not chunks or not all(isinstance(c, torch.Tensor) and c.dim() == 2 for c in chunks):
        raise ValueError(f"DINOLoss: {what} must be a non-empty list of 2-D tensors [batch, K]")
    return chunks


class DINOLoss(nn.Module):
    """Cross-entropy ``-sum_k p_t[k] log softmax(s / student_temp)[k]`` over crop pairs.

    Every student crop is paired with every teacher (global) crop except the same
    view: student crop ``i < n_global_student_crops`` is the same image view as
    teacher crop ``i``.  Each pair's loss is averaged over the batch; the result is
    the mean over valid pairs (``reduction="mean"``) or their sum (``"sum"``, for a
    caller that combines several calls and normalises by the total pair count).

    Computed in fp32 whatever the input dtype.  Because the loss is linear in the
    targets, each student crop is scored once against the sum of its teachers, so
    memory stays ``O(B * K)`` per crop instead of per pair.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        if not student_temp > 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"

    def forward(
        self,
        student_logits: TensorOrList,
        teacher_probs: TensorOrList,
        n_global_student_crops: int | None = None,
        n_teacher_crops: int = 2,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """Loss for student logits (list of ``[B, K]`` or ``[n_crops*B, K]``) vs teacher probs.

        ``teacher_probs`` is a list of ``[B, K]`` (one per global crop) or a tensor
        ``[n_teacher_crops*B, K]``.  ``n_global_student_crops`` (default: the number of
        teacher crops) says how many leading student crops are the teacher's views;
        pass 0 when ``student_logits`` holds only local crops.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"DINOLoss: reduction must be 'mean' or 'sum', got {reduction!r}")
        teachers = _as_chunks(teacher_probs, n_teacher_crops, None, "teacher_probs")
        batch, n_protos = teachers[0].shape
        if any(t.shape != teachers[0].shape for t in teachers):
            raise ValueError(f"DINOLoss: teacher crops differ in shape: {[tuple(t.shape) for t in teachers]}")
        students = _as_chunks(student_logits, None, batch, "student_logits")
        for i, s in enumerate(students):
            if s.shape != (batch, n_protos):
                raise ValueError(
                    f"DINOLoss: student crop {i} has shape {tuple(s.shape)}, expected ({batch}, {n_protos})"
                )
        n_global = len(teachers) if n_global_student_crops is None else n_global_student_crops
        if not 0 <= n_global <= min(len(teachers), len(students)):
            raise ValueError(
                f"DINOLoss: n_global_student_crops={n_global} must be between 0 and "
                f"min(#teacher crops={len(teachers)}, #student crops={len(students)})"
            )
        n_pairs = dino_pair_count(len(students), len(teachers), n_global)
        if n_pairs == 0:
            raise ValueError("DINOLoss: no valid (student, teacher) pair: every student crop is a teacher view")

        teachers32 = torch.stack([t.detach().float() for t in teachers])  # [n_teachers, B, K]
        teacher_total = teachers32.sum(dim=0)
        # All crops in one [n_crops, B, K] pass: a tensor input is viewed, not split (splitting makes
        # backward concatenate per-crop gradients), and one log-softmax runs instead of one per crop.
        if isinstance(student_logits, torch.Tensor):
            s = student_logits.reshape(len(students), batch, n_protos)
        else:
            s = torch.stack(students)
        log_probs = F.log_softmax(s.float() * (1.0 / self.student_temp), dim=-1)  # mul: cheaper than div
        # Same-view pairs removed by subtracting that view's targets from the sum.
        targets = teacher_total.expand(len(students), batch, n_protos)
        if n_global:
            targets = torch.cat([teacher_total - teachers32[:n_global], targets[n_global:]])
        total = -(targets * log_probs).sum(dim=-1).mean(dim=-1).sum()
        return total / n_pairs if reduction == "mean" else total
