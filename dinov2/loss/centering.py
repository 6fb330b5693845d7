"""Teacher centering: Sinkhorn-Knopp normalisation and EMA softmax centering.

Both turn raw teacher prototype logits ``[B, K]`` into target probabilities and
both are collective when ``torch.distributed`` is initialised: every rank must call
them in the same order with its local batch, and the result equals what a single
process would compute on the concatenated global batch.  All arithmetic is fp32
whatever the input dtype (bf16/fp16 logits lose too much precision in ``exp``).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["SoftmaxCenter", "sinkhorn_knopp"]


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``op`` is "sum" or "max"); a no-op without a process group."""
    if _dist_active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def _check_logits(teacher_logits: torch.Tensor, teacher_temp: float, name: str) -> None:
    if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 2:
        shape = tuple(teacher_logits.shape) if isinstance(teacher_logits, torch.Tensor) else type(teacher_logits)
        raise ValueError(f"{name}: teacher logits must be a 2-D tensor [batch, prototypes], got {shape}")
    if not teacher_temp > 0:
        raise ValueError(f"{name}: teacher_temp must be > 0, got {teacher_temp}")


def _global_logsumexp(z: torch.Tensor, dim: int | None) -> torch.Tensor:
    """``log(sum(exp(z)))`` over ``dim`` (``None``: all entries) *and* over all ranks.

    Stable: the (all-reduced) max is factored out before ``exp``.  Only for reductions
    that run over batch rows (dim 0, or all entries), since those rows are split
    across ranks.
    """
    flat = dim is None
    if flat:
        z, dim = z.reshape(-1, 1), 0
    out_shape = list(z.shape)
    out_shape[dim] = 1
    if z.shape[dim]:
        local_max = z.amax(dim=dim, keepdim=True)
    else:  # this rank holds no rows: neutral element for the max
        local_max = z.new_full(out_shape, float("-inf"))
    shift = _all_reduce(local_max, "max")
    # A -inf max means no entries on any rank; shift by 0 then so exp() gives 0, not NaN.
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    lse = shift + torch.log(_all_reduce(torch.exp(z - shift).sum(dim=dim, keepdim=True)))
    return lse.reshape(1) if flat else lse


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp teacher targets ``[B, K]`` (fp32, each row sums to 1).

    The DINOv2 reference algorithm: ``Q = exp(logits / temp)``, scaled to total mass
    1, then ``n_iterations`` rounds of "each prototype gets mass 1/K" followed by
    "each sample gets mass 1/B", with ``B`` the *global* batch size (local batch
    summed over ranks); finally ``Q * B`` so each sample's row sums to 1.  The total
    mass and the per-prototype sums are over the global batch (all-reduced), the
    per-sample sums are local.

    It runs in the log domain (every division is a subtraction of a log-sum-exp whose
    max is all-reduced first), which is the same computation up to fp32 rounding but
    cannot overflow on large logits nor underflow a whole sample or prototype to
    ``0/0 = NaN`` when the logit spread is large; results are identical across world
    sizes because every shift is global.
    """
    _check_logits(teacher_logits, teacher_temp, "sinkhorn_knopp")
    if n_iterations < 0:
        raise ValueError(f"sinkhorn_knopp: n_iterations must be >= 0, got {n_iterations}")
    z = teacher_logits.detach().float() / teacher_temp  # log Q, [B, K] (the reference's Q is [K, B])
    local_batch, n_prototypes = z.shape
    global_batch = _all_reduce(torch.tensor([float(local_batch)], device=z.device))
    log_b, log_k = torch.log(global_batch), math.log(n_prototypes)

    z = z - _global_logsumexp(z, dim=None)  # total mass 1
    for _ in range(n_iterations):
        z -= _global_logsumexp(z, dim=0) + log_k  # each prototype: mass 1/K over the global batch
        z -= torch.logsumexp(z, dim=1, keepdim=True) + log_b  # each sample: mass 1/B
    return torch.exp(z + log_b)


class SoftmaxCenter(nn.Module):
    """DINO softmax centering with an EMA center of the teacher logits.

    ``probs(logits, temp) = softmax((logits - center) / temp)``; call
    ``update(logits)`` once per step *after* ``probs`` with the same logits.  The
    update uses the batch mean over all ranks (sum and count are all-reduced together,
    so unequal local batch sizes are handled exactly).  ``center`` is a registered
    fp32 buffer ``[1, K]`` (checkpointed with the module, same shape as the reference).

    With ``update(..., async_op=True)`` the all-reduce runs in the background and the
    EMA is applied at the next ``probs``/``apply_pending_update``/``state_dict`` call.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"SoftmaxCenter: out_dim must be > 0, got {out_dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SoftmaxCenter: momentum must be in [0, 1], got {momentum}")
        self.out_dim = out_dim
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim, dtype=torch.float32))
        self._pending: torch.Tensor | None = None  # [1, K+1]: logit sums, then count
        self._pending_handle = None
        # A checkpoint must never miss an update that is still in flight.
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.apply_pending_update())

    def extra_repr(self) -> str:
        return f"out_dim={self.out_dim}, momentum={self.momentum}"

    @torch.no_grad()
    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Centered, sharpened teacher probabilities ``[B, K]`` in fp32."""
        _check_logits(teacher_logits, teacher_temp, "SoftmaxCenter.probs")
        self._check_dim(teacher_logits)
        self.apply_pending_update()
        return torch.softmax((teacher_logits.detach().float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor, async_op: bool = False) -> None:
        """EMA update of the center with the global batch mean of ``teacher_logits``."""
        _check_logits(teacher_logits, 1.0, "SoftmaxCenter.update")
        self._check_dim(teacher_logits)
        self.apply_pending_update()  # never overwrite an update that was not applied
        logits = teacher_logits.detach().float()
        packed = torch.empty(1, self.out_dim + 1, dtype=torch.float32, device=logits.device)
        packed[:, :-1] = logits.sum(dim=0, keepdim=True)
        packed[:, -1] = logits.shape[0]
        handle = None
        if _dist_active():
            handle = dist.all_reduce(packed, async_op=async_op)
        self._pending, self._pending_handle = packed, handle
        if not async_op:
            self.apply_pending_update()

    @torch.no_grad()
    def apply_pending_update(self) -> None:
        """Wait for an outstanding all-reduce (if any) and apply its EMA step."""
        if self._pending is None:
            return
        if self._pending_handle is not None:
            self._pending_handle.wait()
        packed, self._pending, self._pending_handle = self._pending, None, None
        packed = packed.to(self.center.device)
        count = packed[:, -1:]
        batch_mean = packed[:, :-1] / count.clamp_min(1.0)
        updated = self.center.float() * self.momentum + batch_mean * (1.0 - self.momentum)
        # Every rank had an empty batch: keep the center (decided on device, no host sync).
        self.center.copy_(torch.where(count > 0, updated, self.center.float()))

    def _check_dim(self, teacher_logits: torch.Tensor) -> None:
        if teacher_logits.shape[1] != self.out_dim:
            raise ValueError(
                f"SoftmaxCenter: logits have {teacher_logits.shape[1]} prototypes, center has {self.out_dim}"
            )
