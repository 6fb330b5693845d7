"""Process-group setup for single-process, torchrun (CPU gloo or CUDA nccl) and SLURM runs.

Without a launcher (no ``RANK``/``WORLD_SIZE`` in the environment) nothing is initialised and
the trainer uses plain modules; every helper here then behaves as for a world of one.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dinov2.run.slurm_env import in_slurm_task, torch_dist_env


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed from torchrun/SLURM env vars, if any.

    ``device``: "auto" (CUDA when available, else CPU), "cpu" or "cuda".  CPU uses gloo, CUDA nccl.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto|cpu|cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but CUDA is not available")

    # SLURM without torchrun (srun starts one process per task): the torchrun variables from the
    # task's SLURM ones.
    if "RANK" not in os.environ and in_slurm_task() and _env_int("SLURM_NTASKS", 1) > 1:
        os.environ.update(torch_dist_env())

    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)

    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
