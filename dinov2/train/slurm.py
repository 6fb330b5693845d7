"""SLURM support for training: preemption handling, requeue, rendezvous, and submitit submission.

Preemption protocol (the training loop's side)::

    from dinov2.train import slurm
    slurm.install_preemption_handler()          # once, in the main thread, before the loop
    for step in ...:
        ...one optimisation step...
        if slurm.preemption_requested():        # every rank, every step (a collective when
            save_checkpoint(...)                #   torch.distributed is up: all ranks agree)
            slurm.requeue_and_exit()            # rank 0: `scontrol requeue $SLURM_JOB_ID`; all exit 75

SLURM sends SIGUSR1 ``signal_delay_s`` before the time limit (``#SBATCH --signal=USR1@120``), SIGTERM
on preemption/cancel (then SIGKILL after ``KillWait``); submitit sends SIGUSR2.  The handler only
records the signal, so the loop stops at a step boundary with consistent state.  The requeued job
runs the same command again and the trainer resumes from its latest checkpoint.

``REQUEUED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again later") marks "stopped early, checkpoint saved,
run again to resume"; outside SLURM nothing requeues, so the caller reruns the command itself.

Submission through submitit (``dinov2 train ... train.launcher=slurm``) uses :func:`submit_training`;
the job runs the same ``dinov2 train`` command per task as ``slurm/train.sbatch`` does.
"""
from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

logger = logging.getLogger(__name__)

REQUEUED_EXIT_CODE = 75
PREEMPTION_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
# Who requeues after the loop stopped: "auto" (rank 0 runs `scontrol requeue` when under SLURM),
# "external" (a wrapper such as the submitit job requeues), "never".
REQUEUE_MODE_ENV = "DINOV2_REQUEUE"
# Dotted config key that selects the launcher (local | slurm) in TrainConfig.
LAUNCHER_KEY = "train.launcher"


# ----------------------------------------------------------------------------- preemption flag
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
            os.write(2, f"[dinov2.slurm] received {name}: will checkpoint and stop after this step\n".encode())
        except OSError:
            pass


def install_preemption_handler(signals: Sequence[int] = PREEMPTION_SIGNALS) -> None:
    """Record SIGUSR1/SIGUSR2/SIGTERM instead of dying; the loop polls :func:`preemption_requested`.

    Must be called from the main thread.  Idempotent.  SIGINT is left alone so Ctrl-C still aborts.
    """
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


def preemption_requested(sync: bool = True) -> bool:
    """True when this process (or, with ``sync``, any rank) received a preemption signal.

    With ``sync`` and an initialised process group this is a collective (one tiny all-reduce): every
    rank must call it at the same step, and then all ranks get the same answer and can save a
    checkpoint together even though SLURM's signals reach the ranks at slightly different times.
    """
    local = _STATE.signum is not None
    # No process group can exist before torch.distributed was imported: skip the (slow) import.
    if not sync or "torch.distributed" not in sys.modules:
        return local
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor([1 if local else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# ----------------------------------------------------------------------------- requeue
def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id to requeue: SLURM_JOB_ID (for an array task that is the task's own job id)."""
    env = os.environ if environ is None else environ
    return env.get("SLURM_JOB_ID") or None


def requeue(job_id: str | None = None, timeout_s: float = 60.0) -> bool:
    """``scontrol requeue JOB``.  Returns True when SLURM accepted it; logs the reason otherwise.

    Fails (False) for a job the user cancelled, one submitted with ``--no-requeue``, or outside SLURM.
    """
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
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

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
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        try:
            if dist.is_available() and dist.is_initialized():
                # Nobody leaves before rank 0's requeue went through: if all tasks ended first the
                # job would complete and could no longer be requeued.
                dist.barrier()
        except (RuntimeError, OSError) as exc:  # the requeue may already be tearing ranks down
            logger.warning("barrier before exit failed: %s", exc)
    raise SystemExit(exit_code)


# ----------------------------------------------------------------------------- rendezvous
_BRACKET = re.compile(r"^(?P<prefix>[^\[]*)\[(?P<ranges>[^\]]+)\](?P<suffix>.*)$")


def _split_nodelist(nodelist: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in nodelist:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        depth += ch == "["
        depth -= ch == "]"
        cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p for p in parts if p]


def expand_nodelist(nodelist: str) -> list[str]:
    """Pure-Python ``scontrol show hostnames``: ``gpu[001-003,7],cpu1`` → gpu001 gpu002 gpu003 gpu7 cpu1."""
    hosts: list[str] = []
    for group in _split_nodelist(nodelist.strip()):
        m = _BRACKET.match(group)
        if not m:
            hosts.append(group)
            continue
        for item in m["ranges"].split(","):
            if "-" in item:
                lo, hi = item.split("-", 1)
                width = len(lo)
                hosts.extend(f"{m['prefix']}{i:0{width}d}{m['suffix']}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{m['prefix']}{item}{m['suffix']}")
    return hosts


def slurm_hostnames(nodelist: str | None = None) -> list[str]:
    """Hosts of the job: ``scontrol show hostnames`` when available, else :func:`expand_nodelist`."""
    nodelist = nodelist if nodelist is not None else os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=False, capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return expand_nodelist(nodelist)


def master_port_for_job(job_id: str | int | None) -> int:
    """A rendezvous port derived from the job id (same on every node; differs between jobs that
    share a node).  Kept in 30000..32699, below Linux's ephemeral range."""
    if job_id in (None, ""):
        return 29500
    return 30000 + int(str(job_id).split("_")[0]) % 2700


def torch_dist_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """torch.distributed env vars (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)
    for one SLURM task, from its SLURM_* variables.  Existing MASTER_ADDR/MASTER_PORT win."""
    env = os.environ if environ is None else environ
    if "SLURM_PROCID" not in env:
        raise RuntimeError("not inside a SLURM task (SLURM_PROCID is unset): run under srun/sbatch")
    hosts = slurm_hostnames(env.get("SLURM_JOB_NODELIST", ""))
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    num_nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")) or 1)
    return {
        "MASTER_ADDR": env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
        "MASTER_PORT": env.get("MASTER_PORT") or str(master_port_for_job(env.get("SLURM_JOB_ID"))),
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": ntasks,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(max(1, int(ntasks) // max(1, num_nodes))),
    }


# ----------------------------------------------------------------------------- submitit launcher
@dataclass
class SlurmLauncherConfig:
    """Resources for ``launcher=slurm`` (the ``slurm:`` section of TrainConfig)."""

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

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        errors = []
        if self.nodes < 1:
            errors.append("slurm.nodes must be >= 1")
        if self.gpus_per_node < 0:
            errors.append("slurm.gpus_per_node must be >= 0")
        if self.tasks_per_node < 1:
            errors.append("slurm.tasks_per_node must be >= 1")
        if self.cpus_per_task < 1:
            errors.append("slurm.cpus_per_task must be >= 1")
        if self.timeout_min < 1:
            errors.append("slurm.timeout_min must be >= 1")
        if not 0 <= self.signal_delay_s < self.timeout_min * 60:
            errors.append("slurm.signal_delay_s must be in [0, timeout_min*60)")
        if errors:
            raise ConfigError("invalid slurm launcher config: " + "; ".join(errors))

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
        if "SLURM_PROCID" in env:
            env.update(torch_dist_env(env))
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
        import submitit

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


def submit_training(cfg: Any, overrides: Sequence[str] = (), *, slurm: SlurmLauncherConfig | None = None,
                    cluster: str = "slurm", python: str | None = None):
    """Submit ``dinov2 train`` for ``cfg`` (a loaded TrainConfig) as a SLURM job through submitit.

    The resolved config is frozen to ``<train.output_dir>/slurm/config.yaml`` (with the launcher set
    to local, so the job trains instead of submitting again); every task runs
    ``dinov2 train -c <that file>``.  Resources come from ``slurm`` or ``cfg.slurm`` (defaults
    otherwise).  ``overrides`` are recorded next to it for provenance.  Returns the submitit Job.
    """
    import submitit
    from omegaconf import OmegaConf

    from dinov2.utils.io import atomic_write_json, atomic_write_text

    run_dir = Path(str(cfg.train.output_dir)).expanduser().resolve()
    if not str(cfg.train.output_dir):
        raise ValueError("train.output_dir must be set to submit a SLURM job")
    slurm = slurm or getattr(cfg, "slurm", None) or SlurmLauncherConfig()
    if not isinstance(slurm, SlurmLauncherConfig):
        slurm = SlurmLauncherConfig(**OmegaConf.to_container(OmegaConf.structured(slurm), resolve=True))
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


# ----------------------------------------------------------------------------- small CLI for sbatch
def _cmd_run_dir(args: Sequence[str]) -> int:
    """``python -m dinov2.train.slurm run-dir CONFIG [overrides]``: validate the config and print
    its train.output_dir (absolute), so the sbatch script fails early on a bad config."""
    from dinov2.train.config import load_train_config
    from dinov2.utils.config import ConfigError

    if not args:
        print("usage: python -m dinov2.train.slurm run-dir CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_train_config(args[0], list(args[1:]))
    except (ConfigError, OSError) as exc:
        print(f"invalid training config {args[0]}: {exc}", file=sys.stderr)
        return 2
    print(Path(cfg.train.output_dir).expanduser().resolve())
    return 0


def _cmd_dist_env(args: Sequence[str]) -> int:
    """``python -m dinov2.train.slurm dist-env``: print torch.distributed exports for this task."""
    try:
        env = torch_dist_env()
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run-dir": _cmd_run_dir, "dist-env": _cmd_dist_env}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m dinov2.train.slurm {{{'|'.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "LAUNCHER_KEY", "PREEMPTION_SIGNALS", "REQUEUED_EXIT_CODE", "REQUEUE_MODE_ENV", "SlurmLauncherConfig",
    "TrainingJob", "expand_nodelist", "install_preemption_handler", "master_port_for_job",
    "preemption_requested", "preemption_signal", "requeue", "requeue_and_exit", "reset_preemption_state",
    "slurm_hostnames", "slurm_job_id", "submit_training", "torch_dist_env", "training_command",
]
