"""Launcher configuration (the ``slurm:`` section of the training config and ``train.launcher``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from dinov2.utils.config import ConfigError


class Launcher(str, Enum):
    local = "local"  # train in this process (torchrun / srun start several)
    slurm = "slurm"  # submit through submitit; each task then trains with launcher=local


@dataclass
class SlurmLauncherConfig:
    """Resources for ``train.launcher=slurm``."""

    nodes: int = 1
    gpus_per_node: int = 0  # > 0: one task per GPU (tasks_per_node is then ignored)
    tasks_per_node: int = 1  # CPU jobs (gloo): processes per node
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # 0 → the cluster's default
    timeout_min: int = 60 * 24
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    job_name: str = "dinov2-train"
    signal_delay_s: int = 120  # SIGUSR2 this long before the time limit → checkpoint + requeue
    max_num_timeout: int = 20  # requeues after hitting the time limit before giving up
    additional_parameters: dict[str, str] = field(default_factory=dict)  # extra `#SBATCH --key=value`
    # Extra shell lines run before srun (module load, conda activate, ...).
    setup: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        err = []
        if self.nodes < 1:
            err.append("slurm.nodes must be >= 1")
        if self.gpus_per_node < 0:
            err.append("slurm.gpus_per_node must be >= 0")
        if self.tasks_per_node < 1:
            err.append("slurm.tasks_per_node must be >= 1")
        if self.cpus_per_task < 1:
            err.append("slurm.cpus_per_task must be >= 1")
        if self.timeout_min < 1:
            err.append("slurm.timeout_min must be >= 1")
        if not 0 <= self.signal_delay_s < self.timeout_min * 60:
            err.append("slurm.signal_delay_s must be in [0, timeout_min*60)")
        return err

    def validate(self) -> None:
        if err := self.errors():
            raise ConfigError("invalid slurm launcher config: " + "; ".join(err))

    @property
    def tasks(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    def executor_parameters(self) -> dict[str, Any]:
        """Keyword arguments for ``submitit.AutoExecutor.update_parameters`` (``max_num_timeout`` goes
        to the AutoExecutor constructor as ``slurm_max_num_timeout``)."""
        params: dict[str, Any] = {
            "name": self.job_name,
            "nodes": self.nodes,
            "tasks_per_node": self.tasks,
            "cpus_per_task": self.cpus_per_task,
            "timeout_min": self.timeout_min,
            "slurm_signal_delay_s": self.signal_delay_s,
            "slurm_additional_parameters": {"requeue": True, **dict(self.additional_parameters)},
        }
        if self.gpus_per_node > 0:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb > 0:
            params["mem_gb"] = self.mem_gb
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(self, key):
                params[f"slurm_{key}"] = getattr(self, key)
        if self.setup:
            params["slurm_setup"] = list(self.setup)
        return params
