"""submitit wrappers: job arrays for the sharded stages, single jobs for gather stages.

The cluster is ALWAYS given explicitly: submitit's ``AutoExecutor`` silently picks
SLURM whenever ``sbatch`` is on PATH, which would turn a laptop test into cluster
jobs.  ``local`` runs each task as a subprocess on this machine, ``debug`` runs
in-process (for tests and debuggers), ``slurm`` submits to the cluster.

Stages are chained by waiting: the orchestrator (``curate run``) submits a stage,
waits for all its tasks (tqdm progress), reports every failed task with its log
path, and only then submits the next stage.  Logs: ``OUT/logs/<stage>/``.
"""
from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from curation.choices import Cluster, coerce


@dataclass
class ExecutorConfig:
    cluster: Cluster = Cluster.local  # never auto-detected
    shards_per_task: int = 1  # embed: input shards per array task
    write_tasks: int = 1  # write: array tasks over output shards (shard i → task i % n)
    timeout_min: int = 240
    slurm_partition: str | None = None
    cpus_per_task: int = 8  # sharded tasks (embed, write)
    gpus_per_task: int = 0
    mem_gb: int = 32
    array_parallelism: int = 256  # max tasks of one array running at once (local: max subprocesses)
    # Gather stages (dedup, decontaminate, retrieve, write plan/finalize) read all embeddings:
    # they get their own, usually bigger, resources.
    gather_cpus_per_task: int = 8
    gather_gpus_per_task: int = 0
    gather_mem_gb: int = 64
    slurm_additional_parameters: dict[str, str] = field(default_factory=dict)
    poll_interval_s: float = 1.0

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        self.cluster = coerce(Cluster, self.cluster, "executor.cluster")
        for name in ("shards_per_task", "write_tasks", "timeout_min", "cpus_per_task", "mem_gb",
                     "array_parallelism", "gather_cpus_per_task", "gather_mem_gb"):
            if getattr(self, name) < 1:
                raise ConfigError(f"key 'executor.{name}': must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_task < 0 or self.gather_gpus_per_task < 0:
            raise ConfigError("key 'executor.gpus_per_task': must be >= 0")


class StageFailed(RuntimeError):
    """One or more tasks of a stage failed; the message lists each with its log path."""


@dataclass
class TaskFailure:
    job_id: str
    description: str
    error: str
    stderr: str
    stdout: str

    def __str__(self) -> str:
        lines = [ln.strip() for ln in self.error.strip().splitlines() if ln.strip()]
        # submitit wraps the worker's traceback: show its final "SomeError: message" line.
        errs = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt)\b.*:", ln)]
        last = errs[-1] if errs else (lines[-1] if lines else "failed")
        return f"  task {self.job_id} ({self.description}): {last}\n    log: {self.stderr}"


def make_executor(cfg: ExecutorConfig, folder: str | Path, name: str, gather: bool = False):
    import submitit

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ex = submitit.AutoExecutor(folder=str(folder), cluster=str(cfg.cluster))
    params: dict[str, Any] = {
        "name": name,
        "timeout_min": cfg.timeout_min,
        "cpus_per_task": cfg.gather_cpus_per_task if gather else cfg.cpus_per_task,
        "gpus_per_node": cfg.gather_gpus_per_task if gather else cfg.gpus_per_task,
        "mem_gb": cfg.gather_mem_gb if gather else cfg.mem_gb,
        "nodes": 1,
        "tasks_per_node": 1,
    }
    if params["gpus_per_node"] == 0:
        params.pop("gpus_per_node")  # clusters without GPU GRES reject even `--gpus-per-node=0`
    if cfg.cluster == "slurm":
        params["slurm_array_parallelism"] = cfg.array_parallelism
        if cfg.slurm_partition:
            params["slurm_partition"] = cfg.slurm_partition
        if cfg.slurm_additional_parameters:
            params["slurm_additional_parameters"] = dict(cfg.slurm_additional_parameters)
    elif cfg.cluster in ("local", "debug"):
        # Local/debug ignore memory and CPU counts; a GPU request is honoured only locally.
        params.pop("mem_gb")
        params.pop("cpus_per_task")
        if cfg.cluster == "debug":
            params.pop("gpus_per_node", None)
    ex.update_parameters(**params)
    return ex


def num_array_tasks(cfg: ExecutorConfig, num_items: int, items_per_task: int) -> int:
    n = max(1, math.ceil(num_items / max(1, items_per_task)))
    if cfg.cluster == "local":
        n = min(n, cfg.array_parallelism)  # LocalExecutor starts every task at once
    return n


def local_threads(cfg: ExecutorConfig, n_tasks: int) -> int:
    """Threads per task of a local array (0 = library default elsewhere): the LocalExecutor starts
    every task at once, and BLAS threads beyond this machine's cores only add spinning."""
    import os

    if cfg.cluster != "local":
        return 0
    return max(1, (os.cpu_count() or 1) // max(1, min(n_tasks, cfg.array_parallelism)))


@dataclass
class _TaskError:
    """What a task raised, returned as a value (debug executor: see :func:`_guarded_call`)."""

    text: str


def _guarded_call(fn: Callable[..., Any], *args: Any) -> Any:
    # submitit's DebugExecutor opens pdb on an exception, which would hang a non-interactive
    # run; in-process tasks therefore return their traceback instead of raising it.
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported by run_tasks with the task's description
        import logging
        import traceback

        text = traceback.format_exc()
        logging.getLogger(__name__).error("task failed:\n%s", text)  # lands in the task's log file
        return _TaskError(text)


def _wait(jobs: Sequence[Any], desc: str, cfg: ExecutorConfig, progress: bool) -> None:
    if cfg.cluster == "debug":
        for job in jobs:  # runs the task in-process now (logging goes to its log files)
            job.results()
        return
    from tqdm import tqdm

    with tqdm(total=len(jobs), desc=desc, unit="task", disable=not progress) as bar:
        done = 0
        while done < len(jobs):
            now = sum(1 for j in jobs if j.done())
            bar.update(now - done)
            done = now
            if done < len(jobs):
                time.sleep(cfg.poll_interval_s)


def run_tasks(
    cfg: ExecutorConfig,
    folder: str | Path,
    name: str,
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    descriptions: Sequence[str] | None = None,
    gather: bool = False,
    progress: bool = True,
) -> list[Any]:
    """Run ``fn(*args)`` for each args tuple (a job array, or one job), wait, return results.

    Raises :class:`StageFailed` listing every failed task with its log path.
    """
    if not calls:
        return []
    ex = make_executor(cfg, folder, name, gather=gather)
    descriptions = list(descriptions or [f"{name}[{i}]" for i in range(len(calls))])
    if cfg.cluster == "debug":
        calls = [(fn, *c) for c in calls]
        fn = _guarded_call
    # SLURM throttles an array itself (slurm_array_parallelism); the local executor starts every task
    # it is handed, so a local array runs in waves of array_parallelism processes.
    wave = len(calls) if cfg.cluster != "local" else max(1, cfg.array_parallelism)
    jobs = []
    for start in range(0, len(calls), wave):
        part = calls[start : start + wave]
        submitted = [ex.submit(fn, *part[0])] if len(part) == 1 else ex.map_array(fn, *zip(*part))
        _wait(submitted, name, cfg, progress)
        jobs.extend(submitted)
    failures: list[TaskFailure] = []
    results: list[Any] = []
    for job, desc in zip(jobs, descriptions):
        try:
            err = job.exception()
        except Exception as exc:  # noqa: BLE001 - e.g. a job killed by the scheduler
            err = exc
        result = job.result() if err is None else None
        if isinstance(result, _TaskError):
            err = result.text
        if err is not None:
            failures.append(TaskFailure(str(job.job_id), desc, str(err), str(job.paths.stderr), str(job.paths.stdout)))
            results.append(None)
        else:
            results.append(result)
    if failures:
        lines = "\n".join(str(f) for f in failures)
        raise StageFailed(f"stage {name}: {len(failures)} of {len(jobs)} task(s) failed\n{lines}")
    return results
