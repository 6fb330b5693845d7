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

    # SLURM without torchrun: map SLURM variables onto the torchrun ones.
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and _env_int("SLURM_NTASKS", 1) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")
        if "MASTER_ADDR" not in os.environ:
            nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
            os.environ["MASTER_ADDR"] = nodelist.split(",")[0].split("[")[0]

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


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (returns a new tensor; identity without a process group)."""
    if not dist.is_initialized():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def broadcast_object(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
