"""Preemption: record SLURM's / submitit's signals, then requeue after the checkpoint is saved.

Protocol (the training loop's side)::

    from dinov2.run import preemption
    preemption.install_preemption_handler()     # once, in the main thread, before the loop
    ...                                         # the trainer reads preemption.requested_locally()
    ...                                         # (a flag, free) every step and agrees across ranks
    ...                                         # at its next log/checkpoint sync, then saves
    preemption.requeue_and_exit()               # rank 0: `scontrol requeue $SLURM_JOB_ID`; all exit 75

SLURM sends SIGUSR1 ``signal_delay_s`` before the time limit (``#SBATCH --signal=USR1@120``), SIGTERM
on preemption/cancel (then SIGKILL after ``KillWait``); submitit sends SIGUSR2.  The handler only
records the signal, so the loop stops at a step boundary with consistent state.  The requeued job
runs the same command again and the trainer resumes from its latest checkpoint.

``REQUEUED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again later") marks "stopped early, checkpoint saved,
run again to resume"; outside SLURM nothing requeues, so the caller reruns the command itself.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

REQUEUED_EXIT_CODE = 75
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Who requeues after the loop stopped: "auto" (rank 0 runs `scontrol requeue` when under SLURM),
# "external" (a wrapper such as the submitit job requeues), "never".
REQUEUE_MODE_ENV = "DINOV2_REQUEUE"


@dataclass
class _PreemptionState:
    signum: int | None = None
    received_at: float | None = None
    installed: bool = False


_STATE = _PreemptionState()


def _on_signal(signum: int, frame: Any) -> None:
    # Runs between bytecodes of the main thread: only record, never do I/O beyond one write.
    if _STATE.signum is None:
        _STATE.signum = signum
        _STATE.received_at = time.time()
        try:
            name = signal.Signals(signum).name
            os.write(2, f"[dinov2.run] received {name}: will checkpoint and stop at the next sync step\n".encode())
        except OSError:
            pass


def install_preemption_handler(signals: Sequence[int] = PREEMPTION_SIGNALS) -> None:
    """Record SIGUSR1/SIGUSR2/SIGTERM instead of dying.  Main thread only; idempotent.
    SIGINT is left alone so Ctrl-C still aborts."""
    for s in signals:
        signal.signal(s, _on_signal)
    _STATE.installed = True


def preemption_handler_installed() -> bool:
    return bool(_STATE.installed)


def reset_preemption_state() -> None:
    """Forget a recorded signal (for tests and for loops that handle several phases)."""
    _STATE.signum = None
    _STATE.received_at = None


def preemption_signal() -> int | None:
    """The first preemption signal received by this process, or None."""
    return _STATE.signum


def requested_locally() -> bool:
    """This process received a preemption signal (no communication)."""
    return _STATE.signum is not None


def preemption_requested(sync: bool = True) -> bool:
    """True when this process (or, with ``sync``, any rank) received a preemption signal.

    With ``sync`` and a process group this is a collective (one tiny all-reduce) that every rank must
    call at the same step.  The trainer does not call it: it folds the local flag into the one
    reduction it already does at log/checkpoint steps.
    """
    local = requested_locally()
    if not sync or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id to requeue: SLURM_JOB_ID (for an array task that is the task's own job id)."""
    env = os.environ if environ is None else environ
    return env.get("SLURM_JOB_ID") or None


def requeue(job_id: str | None = None, timeout_s: float = 60.0) -> bool:
    """``scontrol requeue JOB``.  True when SLURM accepted it; logs the reason otherwise (a job the
    user cancelled, one submitted with ``--no-requeue``, or not under SLURM)."""
    job_id = job_id or slurm_job_id()
    if not job_id:
        logger.warning("not running under SLURM (no SLURM_JOB_ID): nothing to requeue")
        return False
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True, text=True,
                              timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.error("scontrol requeue %s failed: %s", job_id, exc)
        return False
    if proc.returncode != 0:
        logger.error("scontrol requeue %s failed (rc=%d): %s", job_id, proc.returncode,
                     (proc.stderr or proc.stdout).strip())
        return False
    logger.info("requeued SLURM job %s", job_id)
    return True


def _global_rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def requeue_and_exit(exit_code: int = REQUEUED_EXIT_CODE) -> NoReturn:
    """Call after the preemption checkpoint is saved, on every rank.

    Rank 0 requeues the SLURM job (unless ``DINOV2_REQUEUE`` is ``external`` or ``never``); all ranks
    wait for it, then leave with ``exit_code`` (SystemExit, so ``finally`` blocks still run).
    """
    mode = os.environ.get(REQUEUE_MODE_ENV, "auto")
    if mode not in ("auto", "external", "never"):
        logger.warning("%s=%r is not auto|external|never; using auto", REQUEUE_MODE_ENV, mode)
        mode = "auto"
    if _global_rank() == 0:
        if mode == "auto" and slurm_job_id():
            requeue()
        elif mode == "auto":
            logger.warning("checkpoint saved; not under SLURM, so run the same command again to resume")
    try:
        if dist.is_available() and dist.is_initialized():
            # Nobody leaves before rank 0's requeue went through: if all tasks ended first the
            # job would complete and could no longer be requeued.
            dist.barrier()
    except (RuntimeError, OSError) as exc:  # the requeue may already be tearing ranks down
        logger.warning("barrier before exit failed: %s", exc)
    raise SystemExit(exit_code)
