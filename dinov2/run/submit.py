"""Submitting training through submitit (``dinov2 train … train.launcher=slurm``).

The resolved config is frozen into the run folder and every SLURM task runs the same
``dinov2 train -c <that file>`` as ``slurm/train.sbatch`` does, as a child process; submitit's
checkpoint hook on rank 0 signals it to save, and requeues the job (see dinov2.run.preemption).
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import submitit
from omegaconf import OmegaConf

from dinov2.run.config import SlurmLauncherConfig
from dinov2.run.preemption import PREEMPTION_SIGNALS, REQUEUE_MODE_ENV, REQUEUED_EXIT_CODE
from dinov2.run.slurm_env import in_slurm_task, torch_dist_env
from dinov2.train.config import TrainConfig
from dinov2.utils.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# Dotted config key that selects the launcher (local | slurm) in TrainConfig.
LAUNCHER_KEY = "train.launcher"


def _poll_exit(pid: int) -> int | None:
    """Exit status of child ``pid`` without reaping it (so Popen can still reap), or None if alive.

    Used instead of Popen.wait/poll, whose internal lock can deadlock when a signal handler in the
    same thread waits on the same child."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1
    if info is None or info.si_pid == 0:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


class TrainingJob:
    """submitit callable: one SLURM task runs one training process (``argv``) as one rank.

    The child gets torch.distributed variables from the task's SLURM ones and
    ``DINOV2_REQUEUE=external``: on preemption it saves a checkpoint and exits 75, and submitit
    (rank 0, through :meth:`checkpoint`) requeues the job, which reruns this callable; the trainer
    then resumes from the latest checkpoint under its run folder.
    """

    def __init__(self, argv: Sequence[str], run_dir: str | os.PathLike, env: Mapping[str, str] | None = None,
                 checkpoint_wait_s: float = 600.0) -> None:
        self.argv = [str(a) for a in argv]
        self.run_dir = str(run_dir)
        self.env = dict(env or {})
        self.checkpoint_wait_s = checkpoint_wait_s
        self._proc: subprocess.Popen | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None  # a live process handle never goes into the pickle
        return state

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.env)
        if in_slurm_task():
            env.update(torch_dist_env())
        env[REQUEUE_MODE_ENV] = "external"
        return env

    def __call__(self) -> dict[str, Any]:
        env = self._child_env()
        logger.info("rank %s/%s: %s", env.get("RANK", "0"), env.get("WORLD_SIZE", "1"), shlex.join(self.argv))
        self._proc = subprocess.Popen(self.argv, env=env)
        # Ranks other than 0 are not checkpointed by submitit (its handler only logs there); pass
        # their signals on so every rank stops at the same step.
        if int(env.get("RANK", "0")) != 0:
            for s in PREEMPTION_SIGNALS:
                signal.signal(s, self._forward_signal)
        while (rc := _poll_exit(self._proc.pid)) is None:
            time.sleep(0.2)
        self._proc.wait()
        if rc == 0:
            return {"run_dir": self.run_dir, "returncode": 0, "rank": int(env.get("RANK", "0"))}
        if rc == REQUEUED_EXIT_CODE:
            # Stopped for preemption: leave without a result so submitit keeps waiting for the
            # requeued run (SystemExit is not recorded as a job error by submitit).
            raise SystemExit(REQUEUED_EXIT_CODE)
        raise RuntimeError(f"training process exited with status {rc}: {shlex.join(self.argv)} "
                           f"(see the job's log in {self.run_dir})")

    def _forward_signal(self, signum: int, frame: Any) -> None:
        proc = self._proc
        if proc is not None and _poll_exit(proc.pid) is None:
            try:
                os.kill(proc.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def checkpoint(self, *args: Any, **kwargs: Any):
        """Called by submitit on rank 0 when the job is preempted or about to time out: let the
        training process save its checkpoint and stop, then hand submitit the same job to requeue."""
        proc = self._proc
        if proc is not None and _poll_exit(proc.pid) is None:
            os.kill(proc.pid, signal.SIGUSR1)
            deadline = time.time() + self.checkpoint_wait_s
            while _poll_exit(proc.pid) is None and time.time() < deadline:
                time.sleep(0.2)
        return submitit.helpers.DelayedSubmission(TrainingJob(self.argv, self.run_dir, self.env,
                                                              self.checkpoint_wait_s))


def training_command(config_path: str | os.PathLike, overrides: Sequence[str] = (),
                     python: str | None = None) -> list[str]:
    """argv of ``dinov2 train -c CONFIG overrides...`` through the given Python interpreter."""
    return [python or sys.executable, "-m", "dinov2.cli", "train", "-c", str(config_path), *overrides]


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> bool:
    node: Any = data
    *parents, last = dotted.split(".")
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    if not isinstance(node, dict) or last not in node:
        return False
    node[last] = value
    return True


def _strip_launcher_overrides(overrides: Sequence[str]) -> list[str]:
    last = LAUNCHER_KEY.split(".")[-1]
    keep = []
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in (LAUNCHER_KEY, last):
            continue
        keep.append(item)
    return keep


def submit_training(cfg: TrainConfig, overrides: Sequence[str] = (), *, slurm: SlurmLauncherConfig | None = None,
                    cluster: str = "slurm", python: str | None = None) -> submitit.Job:
    """Submit ``dinov2 train`` for ``cfg`` (a loaded TrainConfig) as a SLURM job through submitit.

    The resolved config is frozen to ``<train.output_dir>/slurm/config.yaml`` (with the launcher set
    to local, so the job trains instead of submitting again); every task runs
    ``dinov2 train -c <that file>``.  Resources come from ``slurm`` or ``cfg.slurm`` (defaults
    otherwise).  ``overrides`` are recorded next to it for provenance.  Returns the submitit Job.
    """
    run_dir = Path(str(cfg.train.output_dir)).expanduser().resolve()
    if not str(cfg.train.output_dir):
        raise ValueError("train.output_dir must be set to submit a SLURM job")
    slurm = slurm or cfg.slurm
    slurm.validate()

    data = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    _set_dotted(data, LAUNCHER_KEY, "local")
    _set_dotted(data, "train.output_dir", str(run_dir))
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    config_file = slurm_dir / "config.yaml"
    atomic_write_text(config_file, OmegaConf.to_yaml(OmegaConf.create(data)))

    argv = training_command(config_file, python=python)
    executor = submitit.AutoExecutor(folder=str(slurm_dir / "submitit"), cluster=cluster,
                                     **({"slurm_max_num_timeout": slurm.max_num_timeout} if cluster == "slurm" else {}))
    if cluster == "slurm":
        executor.update_parameters(**slurm.executor_parameters())
    job = executor.submit(TrainingJob(argv, run_dir))
    atomic_write_json(slurm_dir / f"submit-{job.job_id}.json", {
        "job_id": str(job.job_id),
        "argv": argv,
        "overrides": _strip_launcher_overrides(overrides),
        "slurm": asdict(slurm),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
    logger.info("submitted SLURM job %s; logs in %s", job.job_id, slurm_dir / "submitit")
    return job
