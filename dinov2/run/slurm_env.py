"""torch.distributed rendezvous variables for a SLURM task, from submitit's job environment.

submitit's ``SlurmJobEnvironment`` reads the task's SLURM variables (rank, local rank, task and
node counts, job id) and parses ``SLURM_JOB_NODELIST``; it is used directly (not through
``submitit.JobEnvironment()``, which only recognises jobs that submitit itself started) so plain
``sbatch`` / ``srun`` tasks work too.  The rendezvous port is ours: derived from the job id and
kept below Linux's ephemeral range, where submitit's helper draws from 20000..60000.
"""
from __future__ import annotations

import os

from submitit.slurm.slurm import SlurmJobEnvironment


def in_slurm_task() -> bool:
    return "SLURM_PROCID" in os.environ


def master_port_for_job(job_id: str | int | None) -> int:
    """Same on every node of a job, different for jobs sharing a node; in 30000..32699."""
    if job_id in (None, ""):
        return 29500
    return 30000 + int(str(job_id).split("_")[0]) % 2700


def torch_dist_env() -> dict[str, str]:
    """MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE for this SLURM task (from
    ``os.environ``).  MASTER_ADDR / MASTER_PORT already set win."""
    if not in_slurm_task():
        raise RuntimeError("not inside a SLURM task (SLURM_PROCID is unset): run under srun/sbatch")
    job = SlurmJobEnvironment()
    hosts = job.hostnames
    return {
        "MASTER_ADDR": os.environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(master_port_for_job(os.environ.get("SLURM_JOB_ID"))),
        "RANK": str(job.global_rank),
        "WORLD_SIZE": str(job.num_tasks),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(max(1, job.num_tasks // max(1, job.num_nodes))),
    }
