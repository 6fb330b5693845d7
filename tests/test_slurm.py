"""SLURM: the one-node test cluster (slurm/local-cluster.sh), slurm/train.sbatch, the submitit
launcher and preemption → checkpoint → requeue → resume (dinov2/run/).

Tests marked ``slurm`` bring up a real one-node cluster (munged, MariaDB, slurmdbd, slurmctld,
slurmd) in a temporary folder once per session and take it down at the end; they skip only where
SLURM cannot be installed (not root, or no apt-get).  The others are plain unit tests.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dinov2.run import preemption, slurm_env, submit
from dinov2.run.config import SlurmLauncherConfig

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "slurm" / "local-cluster.sh"
TRAIN_SBATCH = REPO / "slurm" / "train.sbatch"
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def _sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run that never raises on a non-zero status: callers assert with the output."""
    return subprocess.run(cmd, check=False, **kw)


# ============================================================================ unit tests (no cluster)
def test_torch_dist_env_from_slurm_variables(monkeypatch):
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "node[07-10]",
           "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_ID": "123456"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    got = slurm_env.torch_dist_env()
    assert got == {"MASTER_ADDR": "node07", "MASTER_PORT": str(30000 + 123456 % 2700), "RANK": "5",
                   "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    # submitit's node-list parser: several groups, ranges and single ids, no scontrol needed.
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[001-003,7],cpu1")
    assert slurm_env.torch_dist_env()["MASTER_ADDR"] == "gpu001"
    # An explicit rendezvous wins; outside a SLURM task it is an error with a reason.
    monkeypatch.setenv("MASTER_ADDR", "h")
    monkeypatch.setenv("MASTER_PORT", "1")
    assert slurm_env.torch_dist_env()["MASTER_PORT"] == "1" and slurm_env.torch_dist_env()["MASTER_ADDR"] == "h"
    monkeypatch.delenv("SLURM_PROCID")
    with pytest.raises(RuntimeError, match="SLURM_PROCID"):
        slurm_env.torch_dist_env()


def test_master_port_is_per_job_and_below_ephemeral_range():
    ports = {slurm_env.master_port_for_job(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(30000 <= p < 32768 for p in ports)
    assert slurm_env.master_port_for_job("77_3") == slurm_env.master_port_for_job(77)  # array ids
    assert slurm_env.master_port_for_job(None) == 29500


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in preemption.PREEMPTION_SIGNALS}
    preemption.reset_preemption_state()
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    preemption.reset_preemption_state()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_preemption_handler_records_signal(restore_signals, sig):
    preemption.install_preemption_handler()
    assert not preemption.preemption_requested()
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # the handler runs at the next bytecode boundary of the main thread
    assert preemption.preemption_requested() and preemption.preemption_signal() == sig
    os.kill(os.getpid(), signal.SIGUSR1)  # later signals keep the first
    assert preemption.preemption_signal() == sig


def test_requeue_and_exit_outside_slurm(restore_signals, monkeypatch, caplog):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv(preemption.REQUEUE_MODE_ENV, raising=False)
    assert preemption.requeue() is False
    with pytest.raises(SystemExit) as exc:
        preemption.requeue_and_exit()
    assert exc.value.code == preemption.REQUEUED_EXIT_CODE
    assert "run the same command again" in caplog.text


def test_requeue_reports_scontrol_failure(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert preemption.requeue("12345") is False
    assert "scontrol requeue 12345 failed" in caplog.text


_SYNC_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    import torch.distributed as dist
    from dinov2.run import preemption
    preemption.install_preemption_handler()
    dist.init_process_group("gloo")
    answers = []
    for step in range(3):
        if step == 1 and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
            time.sleep(0.05)
        answers.append(preemption.preemption_requested())
    print("ANSWERS", dist.get_rank(), answers, flush=True)
    dist.destroy_process_group()
""")


def test_preemption_flag_is_agreed_by_all_ranks(tmp_path):
    script = tmp_path / "w.py"
    script.write_text(_SYNC_WORKER)
    port = str(29000 + os.getpid() % 500)
    procs = [subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": port})
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    for r, (out, _) in enumerate(outs):
        assert f"ANSWERS {r} [False, True, True]" in out


def test_launcher_config_validation_and_parameters():
    from dinov2.utils.config import ConfigError

    cfg = SlurmLauncherConfig(nodes=2, gpus_per_node=8, tasks_per_node=3, cpus_per_task=10, mem_gb=200,
                                    partition="learn", timeout_min=60, additional_parameters={"exclusive": "user"})
    cfg.validate()
    p = cfg.executor_parameters()
    assert p["tasks_per_node"] == 8 and p["gpus_per_node"] == 8 and p["nodes"] == 2
    assert p["slurm_partition"] == "learn" and p["slurm_signal_delay_s"] == 120 and p["mem_gb"] == 200
    assert p["slurm_additional_parameters"] == {"requeue": True, "exclusive": "user"}
    assert "slurm_account" not in p
    with pytest.raises(ConfigError, match="slurm.nodes"):
        SlurmLauncherConfig(nodes=0).validate()
    with pytest.raises(ConfigError, match="signal_delay_s"):
        SlurmLauncherConfig(timeout_min=1, signal_delay_s=120).validate()


def test_training_job_exit_codes_and_checkpoint(tmp_path, monkeypatch):
    for var in ("SLURM_PROCID", "RANK"):
        monkeypatch.delenv(var, raising=False)
    ok = submit.TrainingJob([PY, "-c", "import os; assert os.environ['DINOV2_REQUEUE'] == 'external'"], tmp_path)
    assert ok()["returncode"] == 0
    with pytest.raises(SystemExit) as exc:  # preempted: no result, submitit waits for the requeued run
        submit.TrainingJob([PY, "-c", "raise SystemExit(75)"], tmp_path)()
    assert exc.value.code == preemption.REQUEUED_EXIT_CODE
    with pytest.raises(RuntimeError, match="exited with status 3"):
        submit.TrainingJob([PY, "-c", "raise SystemExit(3)"], tmp_path)()
    job = submit.TrainingJob(["x", "y"], tmp_path, env={"A": "1"})
    job._proc = subprocess.Popen([PY, "-c", "pass"])  # a live handle never goes into the pickle
    again = pickle.loads(pickle.dumps(job))
    assert again._proc is None and again.argv == ["x", "y"] and again.env == {"A": "1"}
    delayed = job.checkpoint()
    assert delayed.function.argv == ["x", "y"] and delayed.function.run_dir == str(tmp_path)


def test_scripts_reject_bad_usage(tmp_path):
    for script in (CLUSTER_SCRIPT, TRAIN_SBATCH):
        assert _sh(["bash", "-n", str(script)]).returncode == 0
    unused = tmp_path / "never-created"
    r = _sh(["bash", str(CLUSTER_SCRIPT), "sideways"], capture_output=True, text=True,
            env={**os.environ, "SLURM_LOCAL_DIR": str(unused)})
    assert r.returncode == 2 and "usage" in r.stderr and not unused.exists()
    r = _sh(["bash", str(CLUSTER_SCRIPT), "down"], capture_output=True, text=True,
            env={**os.environ, "SLURM_LOCAL_DIR": str(unused)})
    assert r.returncode == 0 and "no cluster" in r.stderr and not unused.exists()
    r = _sh(["bash", str(TRAIN_SBATCH)], capture_output=True, text=True)
    assert r.returncode == 2 and "usage" in r.stderr
    r = _sh(["bash", str(TRAIN_SBATCH), "/no/such.yaml"], capture_output=True, text=True)
    assert r.returncode == 2 and "config file not found" in r.stderr


# ============================================================================ the cluster
@dataclass
class Cluster:
    dir: Path
    conf: Path


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        pytest.skip("SLURM is not installed and cannot be installed here (needs root and apt-get)")
    d = tmp_path_factory.mktemp("slurm-local")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(d)}
    t0 = time.time()
    up = _sh(["bash", str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=900)
    if up.returncode == 3:
        pytest.skip(f"SLURM cannot be installed here: {up.stderr.strip()}")
    assert up.returncode == 0, up.stderr
    conf = d / "etc" / "slurm.conf"
    assert f"export SLURM_CONF={conf}" in up.stdout
    print(f"\n[slurm] cluster up in {time.time() - t0:.1f}s ({d})")
    try:
        yield Cluster(d, conf)
    finally:
        t0 = time.time()
        down = _sh(["bash", str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True, text=True,
                              timeout=300)
        print(f"\n[slurm] cluster down in {time.time() - t0:.1f}s: {down.stderr.strip()}")


@pytest.fixture
def cluster(slurm_cluster, monkeypatch):
    """The session's cluster, with SLURM_CONF set for this test (sbatch, sacct, submitit)."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    return slurm_cluster


def _run(cmd: list[str], **kw) -> str:
    r = _sh(cmd, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def sbatch(*args: str, env: dict | None = None) -> str:
    return _run(["sbatch", "--parsable", *args], env={**os.environ, **(env or {})}).strip().split(";")[0]


def job_history(job_id: str) -> list[str]:
    """States of every run of the job (requeues included), oldest first, from accounting."""
    out = _run(["sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State"])
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_job(job_id: str, timeout: float = 240) -> str:
    """Wait until the job has left the queue and accounting shows a final state; return it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        queued = _sh(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True,
                                text=True).stdout.strip()
        if not queued:
            hist = job_history(job_id)
            if hist and hist[-1] in FINAL_STATES:
                return hist[-1]
        time.sleep(0.5)
    _sh(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout}s (history {job_history(job_id)})")


def wait_for(pred, timeout: float, what: str, poll: float = 0.2, job_id: str | None = None, log: Path | None = None):
    """Poll ``pred`` until truthy; with ``job_id``, fail at once if the job ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        if job_id is not None and not _sh(["squeue", "-h", "-j", job_id], capture_output=True,
                                          text=True).stdout.strip():
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"job {job_id} ended ({job_history(job_id)}) before {what}\n{tail}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.slurm
def test_cluster_runs_batch_and_array_jobs_with_accounting(cluster, tmp_path):
    t0 = time.time()
    env = {**os.environ, "SLURM_LOCAL_DIR": str(cluster.dir)}
    up = _sh(["bash", str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0 and f"SLURM_CONF={cluster.conf}" in up.stdout  # idempotent
    status = _sh(["bash", str(CLUSTER_SCRIPT), "status"], env=env, capture_output=True, text=True)
    assert status.returncode == 0 and "slurmdbd: running" in status.stdout and "idle" in status.stdout

    single = sbatch("-o", str(tmp_path / "one-%j.out"), "--wrap", "echo hello from $SLURM_JOB_ID")
    array = sbatch("-o", str(tmp_path / "arr-%A_%a.out"), "--array=0-3",
                   "--wrap", f"echo $((SLURM_ARRAY_TASK_ID * SLURM_ARRAY_TASK_ID)) > {tmp_path}/sq-$SLURM_ARRAY_TASK_ID")
    two = sbatch("-n", "2", "-o", str(tmp_path / "two-%j.out"), "--wrap", "srun hostname")
    assert wait_job(single) == "COMPLETED" and wait_job(array) == "COMPLETED" and wait_job(two) == "COMPLETED"
    assert (tmp_path / f"one-{single}.out").read_text().strip() == f"hello from {single}"
    assert [int((tmp_path / f"sq-{i}").read_text()) for i in range(4)] == [0, 1, 4, 9]
    assert (tmp_path / f"two-{two}.out").read_text().split() == [socket.gethostname()] * 2
    tasks = _run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "JobID,State"]).split()
    assert sorted(tasks) == [f"{array}_{i}|COMPLETED" for i in range(4)]
    print(f"\n[slurm] batch + 4-task array + 2-task srun: {time.time() - t0:.1f}s")


@pytest.mark.slurm
def test_submitit_job_states_come_from_sacct(cluster, tmp_path):
    import submitit

    t0 = time.time()
    ex = submitit.AutoExecutor(folder=str(tmp_path / "sub"), cluster="slurm")
    ex.update_parameters(timeout_min=5, cpus_per_task=1, mem_gb=1, slurm_array_parallelism=4)
    # Functions the job can import (this test module is not importable from the job's process).
    jobs = ex.map_array(pow, [1, 2, 3], [2, 2, 2])
    bad = ex.submit(math.sqrt, -1)
    sleeper = ex.submit(time.sleep, 4)
    # Live states come from sacct (without slurmdbd submitit reads UNKNOWN for everything).
    seen = wait_for(lambda: {sleeper.watcher.get_state(sleeper.job_id, mode="force")} & {"RUNNING"}, 60,
                    "submitit to report RUNNING")
    assert seen == {"RUNNING"}
    assert [j.result() for j in jobs] == [1, 4, 9]
    with pytest.raises(submitit.core.utils.FailedJobError, match="math domain error"):
        bad.result()
    assert sleeper.result() is None
    for j in [*jobs, bad, sleeper]:
        wait_job(j.job_id)
    watcher = sleeper.watcher
    watcher.clear()  # forget cached states: ask accounting again
    assert [watcher.get_state(j.job_id, mode="force") for j in jobs] == ["COMPLETED"] * 3
    assert watcher.get_state(bad.job_id, mode="force") == "FAILED"
    assert watcher.get_state(sleeper.job_id, mode="force") == "COMPLETED"
    print(f"\n[slurm] submitit 3-task array + failing job + sleeping job: {time.time() - t0:.1f}s")


# ---------------------------------------------------------------------------- preemption, toy trainer
# A minimal loop that follows the documented hook exactly, with gloo collectives and a JSON
# "checkpoint", so the requeue machinery is tested independently of the real trainer.
TOY_TRAINER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from dinov2.run import preemption
    preemption.install_preemption_handler()
    assert sys.argv[1] == "-c"
    opts = dict(a.split("=", 1) for a in sys.argv[3:])
    out, steps, step_s = Path(opts["out"]), int(opts["steps"]), float(opts["step_s"])
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    use_dist = ws > 1 and opts.get("dist", "1") == "1"  # dist=0: independent ranks, no torch import
    if use_dist:
        import torch, torch.distributed as dist
        dist.init_process_group("gloo")
    rank = int(os.environ.get("RANK", "0"))
    ck = out / "ckpt.json"
    start = json.loads(ck.read_text())["step"] if ck.exists() else 0
    def event(msg):
        with open(out / f"events-rank{rank}.log", "a") as f:
            f.write(f"{msg} restart={os.environ.get('SLURM_RESTART_COUNT', '0')}\\n")
    def save(step):
        if rank == 0:
            tmp = ck.with_suffix(".tmp"); tmp.write_text(json.dumps({"step": step})); os.replace(tmp, ck)
        if use_dist:
            dist.barrier()
    event(f"start step={start} world={ws}")
    total = rank + 1
    for step in range(start, steps):
        if use_dist:
            t = torch.ones(1) * (rank + 1)
            dist.all_reduce(t)
            total = int(t.item())
        time.sleep(step_s)
        if (step + 1) % 5 == 0:
            save(step + 1)
        if preemption.preemption_requested():
            save(step + 1)
            event(f"preempted step={step + 1}")
            preemption.requeue_and_exit()
    save(steps)
    event(f"done step={steps} sum={total}")
""")


def _events(run: Path, rank: int) -> list[str]:
    path = run / f"events-rank{rank}.log"
    return path.read_text().splitlines() if path.exists() else []


def _check_toy_resumed(run: Path, steps: int, synced: bool) -> None:
    """Each rank: started at 0, stopped on the signal, restarted where rank 0 saved, finished."""
    stops = []
    for rank in range(2):
        ev = _events(run, rank)
        assert len(ev) == 4, ev
        assert ev[0] == "start step=0 world=2 restart=0"
        stops.append(int(re.match(r"preempted step=(\d+) restart=0", ev[1])[1]))
        assert 0 < stops[-1] < steps
        assert ev[2] == f"start step={stops[0]} world=2 restart=1", ev  # resumed from the checkpoint
        assert ev[3] == f"done step={steps} sum={3 if synced else rank + 1} restart=1"
    if synced:  # the all-reduced flag made both ranks stop at the same step
        assert stops[0] == stops[1]


@pytest.mark.slurm
def test_sbatch_toy_preemption_usr1_requeues_and_resumes(cluster, tmp_path):
    t0 = time.time()
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "toy.py").write_text(TOY_TRAINER)
    (tmp_path / "c.yaml").write_text("{}\n")
    job = sbatch("-n", "2", "-o", str(run / "sbatch-%j.out"), str(TRAIN_SBATCH), str(tmp_path / "c.yaml"),
                 f"out={run}", "steps=40", "step_s=0.2", "dist=1",
                 env={"TRAIN_CMD": f"{PY} {tmp_path / 'toy.py'}", "RUN_DIR": str(run)})
    wait_for(lambda: (run / "ckpt.json").exists(), 240, "the first checkpoint", job_id=job,
             log=run / "slurm" / f"job-{job}.log")
    # What SLURM does `signal_delay_s` before the time limit (--signal=USR1@120): USR1 to the steps.
    _run(["scancel", "--signal=USR1", job])
    assert wait_job(job) == "COMPLETED"
    assert job_history(job) == ["REQUEUED", "COMPLETED"]
    _check_toy_resumed(run, 40, synced=True)
    launches = (run / "slurm" / "launches.log").read_text()
    assert "restart 0" in launches and "restart 1" in launches and "exited with status 0" in launches
    print(f"\n[slurm] sbatch toy run with USR1 preemption → requeue → resume: {time.time() - t0:.1f}s")


@pytest.mark.slurm
def test_submitit_training_job_preemption_requeues_and_resumes(cluster, tmp_path):
    import submitit

    t0 = time.time()
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "toy.py").write_text(TOY_TRAINER)
    ex = submitit.AutoExecutor(folder=str(run / "submitit"), cluster="slurm")
    ex.update_parameters(tasks_per_node=2, cpus_per_task=1, mem_gb=1, timeout_min=30, slurm_signal_delay_s=60,
                         slurm_additional_parameters={"requeue": True})
    job = ex.submit(submit.TrainingJob([PY, str(tmp_path / "toy.py"), "-c", "x", f"out={run}", "steps=40",
                                       "step_s=0.2", "dist=0"], run))
    wait_for(lambda: (run / "ckpt.json").exists(), 240, "the first checkpoint", job_id=job.job_id,
             log=run / "submitit" / f"{job.job_id}_0_log.err")
    job._interrupt()  # submitit's simulated preemption: SIGTERM then SIGUSR2 to the tasks
    results = job.results()
    assert [r["rank"] for r in results] == [0, 1] and all(r["returncode"] == 0 for r in results)
    assert wait_job(job.job_id) == "COMPLETED"
    assert job_history(job.job_id) == ["REQUEUED", "COMPLETED"]
    _check_toy_resumed(run, 40, synced=False)
    print(f"\n[slurm] submitit toy run with preemption → requeue → resume: {time.time() - t0:.1f}s")


# ---------------------------------------------------------------------------- the real trainer
TINY_TRAIN = REPO / "configs" / "train" / "tiny.yaml"
TRAIN_STEPS = 6


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    """Two WebDataset shards of 24 JPEG crops of scikit-image's sample photos."""
    import numpy as np
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("train-shards")
    photos = [getattr(data, n)() for n in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
                                           "retina")]
    rng = np.random.default_rng(0)
    for s in range(2):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tf:
            for i in range(24):
                img = photos[(s * 24 + i) % len(photos)]
                h, w = img.shape[:2]
                side = int(min(h, w) * rng.uniform(0.4, 0.9))
                y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                buf = io.BytesIO()
                Image.fromarray(img[y:y + side, x:x + side]).resize((96, 96)).save(buf, "JPEG", quality=90)
                info = tarfile.TarInfo(f"s{s}_{i:04d}.jpg")
                info.size, info.mtime = len(buf.getvalue()), 0
                tf.addfile(info, io.BytesIO(buf.getvalue()))
    return str(root / "shard-{000000..000001}.tar")


def tiny_train_overrides(run: Path, shards: str) -> list[str]:
    """A 2-block, 64-dim ViT on 42/28 px crops, 4 images per rank: seconds per step on this CPU."""
    return [
        f"train.output_dir={run}", f"optim.max_steps={TRAIN_STEPS}", "train.progress=false",
        "train.tensorboard=false", "model.depth=2", "model.embed_dim=64", "model.num_heads=2",
        "model.drop_path_rate=0.0", "head.dino_out_dim=256", "head.dino_hidden_dim=64", "head.dino_bottleneck_dim=32",
        "head.ibot_out_dim=256", "optim.epoch_length=4", "optim.epochs=5", "optim.warmup_epochs=1",
        "optim.freeze_last_layer_epochs=0.5", "data.batch_size=4", "data.crops.global_crops_size=42",
        "data.crops.local_crops_size=28", "data.crops.local_crops_number=2", "data.num_workers=0",
        "data.streams_per_rank=1", "checkpoint.every_n_steps=2", "checkpoint.keep_last=0", "compute.device=cpu",
        f"data.sources=[{{pattern: '{shards}'}}]",
    ]


def _ckpt_done(run: Path, step: int) -> bool:
    return (run / "ckpt" / f"step_{step:06d}" / "meta.json").exists()


def _teacher(run: Path, step: int) -> dict:
    from dinov2.train.checkpoint import load_teacher_backbone_state

    return load_teacher_backbone_state(run / "ckpt" / f"step_{step:06d}")


@pytest.fixture(scope="module")
def sbatch_training(train_shards, slurm_cluster, tmp_path_factory):
    """`sbatch -n 2 slurm/train.sbatch` (gloo), preempted by `scontrol requeue` after its first
    checkpoint; returns the run folder and job id once the requeued job has finished."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(slurm_cluster.conf))
    try:
        t0 = time.time()
        run = tmp_path_factory.mktemp("sbatch-train") / "run"
        job = sbatch("-n", "2", "-o", str(run.parent / "sbatch-%j.out"), str(TRAIN_SBATCH), str(TINY_TRAIN),
                     *tiny_train_overrides(run, train_shards), env={"PATH": f"{Path(PY).parent}:{os.environ['PATH']}"})
        wait_for(lambda: _ckpt_done(run, 2), 300, "the step-2 checkpoint", job_id=job,
                 log=run / "slurm" / f"job-{job}.log")
        _run(["scontrol", "requeue", job])  # what a preempting scheduler does (PreemptMode=REQUEUE)
        state = wait_job(job, timeout=400)
        wall = time.time() - t0
    finally:
        mp.undo()
    print(f"\n[slurm] sbatch 2-task tiny training, requeued once, {TRAIN_STEPS} steps: {wall:.1f}s")
    return {"run": run, "job": job, "state": state}


@pytest.mark.slurm
def test_sbatch_training_two_tasks_requeued_resumes_to_completion(cluster, sbatch_training):
    run, job = sbatch_training["run"], sbatch_training["job"]
    assert sbatch_training["state"] == "COMPLETED", (run / "slurm" / f"job-{job}.log").read_text()[-3000:]
    assert job_history(job) == ["REQUEUED", "COMPLETED"]
    launches = (run / "slurm" / "launches.log").read_text()
    assert "restart 0: 2 tasks" in launches and "restart 1: 2 tasks" in launches
    log = (run / "slurm" / f"job-{job}.log").read_text()
    assert re.search(r"resumed from .*step_0000\d\d", log), log[-3000:]
    assert "trained steps" in log and _ckpt_done(run, TRAIN_STEPS)


@pytest.mark.slurm
def test_submitit_launcher_cancel_resubmit_resumes_with_same_result(cluster, sbatch_training, train_shards,
                                                                    tmp_path):
    """`launcher=slurm` path: submit, `scancel` after the first checkpoint, submit again → it
    resumes and ends with exactly the weights of the sbatch run (interrupted differently)."""
    from dinov2.train.config import load_train_config

    t0 = time.time()
    run = tmp_path / "run"
    overrides = tiny_train_overrides(run, train_shards)
    cfg = load_train_config(TINY_TRAIN, overrides)
    resources = SlurmLauncherConfig(tasks_per_node=2, cpus_per_task=1, timeout_min=30)
    first = submit.submit_training(cfg, overrides, slurm=resources, python=PY)
    wait_for(lambda: _ckpt_done(run, 2), 300, "the step-2 checkpoint", job_id=first.job_id,
             log=run / "slurm" / "submitit" / f"{first.job_id}_0_log.err")
    _run(["scancel", first.job_id])
    assert wait_job(first.job_id) == "CANCELLED"
    assert not _ckpt_done(run, TRAIN_STEPS)
    second = submit.submit_training(cfg, overrides, slurm=resources, python=PY)
    results = second.results()
    assert [r["returncode"] for r in results] == [0, 0]
    assert wait_job(second.job_id) == "COMPLETED"
    log = second.stderr() or ""
    assert re.search(r"resumed from .*step_0000\d\d", log), log[-3000:]
    assert (run / "slurm" / "config.yaml").is_file() and (run / "slurm" / f"submit-{second.job_id}.json").is_file()
    ref, got = _teacher(sbatch_training["run"], TRAIN_STEPS), _teacher(run, TRAIN_STEPS)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch_allclose(ref[k], got[k]), k
    print(f"\n[slurm] submitit launcher: run, scancel, resubmit, resume, {TRAIN_STEPS} steps: {time.time() - t0:.1f}s")


def torch_allclose(a, b) -> bool:
    import torch

    return bool(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6))


# ---------------------------------------------------------------------------- curation on SLURM
@pytest.fixture(scope="module")
def curation_world(tmp_path_factory):
    import torch

    from curation.synth import CrawlSpec, build_crawl, load_photos
    from dinov2.models import build_model
    from dinov2.models.checkpoint import save_official

    root = tmp_path_factory.mktemp("curate-slurm")
    data = root / "data"
    # The curation tests' crawl: with this random-init embedder it keeps images at every stage.
    spec = CrawlSpec(n_base=24, n_eval_per_photo=2, n_query_per_photo=3, n_heldout_per_photo=1, n_junk=3,
                     images_per_shard=12, min_out_side=48, max_out_side=96)
    build_crawl(load_photos(limit=8, max_side=160), data, spec, seed=0)
    torch.manual_seed(0)
    ckpt = save_official(build_model("vit_tiny", img_size=56, depth=2), data / "vit_tiny_random.pth")
    args = ["-c", str(REPO / "configs" / "curation" / "tiny.yaml"), "--no-progress", f"inputs=[{data / 'crawl'}/*.tar]",
            f"eval_sets.photos=[{data / 'eval'}]", f"query_sets.q.inputs=[{data / 'query'}]",
            f"embedders.tiny.checkpoint={ckpt}", "executor.write_tasks=2"]
    return {"root": root, "args": args}


def _curate(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = _sh([PY, "-m", "curation.cli", "run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, f"curate run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _drop_timings(obj):
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if not k.endswith("_s")}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def _stage_outputs(out: Path) -> dict[str, bytes]:
    """Every file a stage wrote (not logs, not the config that names the executor, not the lock file
    that names its holder), with the output folder's own path normalised away and wall-clock fields
    (``*_s``) dropped from JSON."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out)
        if p.is_file() and rel.parts[0] != "logs" and str(rel) not in ("config.yaml", ".lock"):
            data = p.read_bytes().replace(str(out).encode(), b"OUT")
            if p.suffix == ".json":
                data = json.dumps(_drop_timings(json.loads(data)), sort_keys=True).encode()
            files[str(rel)] = data
    return files


@pytest.mark.slurm
def test_curate_run_on_slurm_matches_local_executor(cluster, curation_world):
    """`curate run executor.cluster=slurm`: array jobs through the cluster, every stage's outputs
    byte-identical to the submitit LocalExecutor's."""
    root, args = curation_world["root"], curation_world["args"]
    t0 = time.time()
    # Both at once: the local run's processes overlap the SLURM jobs' queueing and start-up.
    local = subprocess.Popen([PY, "-m", "curation.cli", "run", *args, f"output_dir={root / 'local'}",
                              "executor.cluster=local"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    on_slurm = _curate([*args, f"output_dir={root / 'slurm'}", "executor.cluster=slurm", "executor.cpus_per_task=1",
                        "executor.mem_gb=1", "executor.gather_cpus_per_task=1", "executor.gather_mem_gb=2"])
    out, err = local.communicate(timeout=600)
    assert local.returncode == 0, f"local curate run failed:\n{out[-3000:]}\n{err[-5000:]}"
    wall = time.time() - t0
    ref, got = _stage_outputs(root / "local"), _stage_outputs(root / "slurm")
    assert "final/manifest.parquet" in ref and any(k.startswith("embed/pool/") for k in ref)
    assert sorted(got) == sorted(ref)
    differ = {name: (ref[name][:800], got[name][:800]) for name in ref if got[name] != ref[name]}
    assert not differ, f"outputs differ between the local and the SLURM executor (local, slurm): {differ}"
    # The sharded stages really ran as SLURM job arrays, and accounting saw every task finish.
    rows = _run(["sacct", "-n", "-X", "-P", "-S", "now-3600", "-o", "JobID,JobName,State"]).split()
    arrays = [r for r in rows if re.match(r"^\d+_\d+\|", r)]
    assert arrays and all(r.endswith("|COMPLETED") for r in arrays), rows
    assert "running on cluster=slurm" in on_slurm.stdout
    print(f"\n[slurm] curate run on SLURM ({len(arrays)} array tasks) and locally, side by side: {wall:.1f}s")


@pytest.mark.slurm
def test_sharded_dedup_on_slurm_is_an_array_matching_gathered(cluster, curation_world):
    """`sharding.mode=sharded` on SLURM: dedup's assign and search steps run as real job arrays of
    >= 4 tasks, and every stage's outputs are byte-identical to a gathered run on the local executor
    (ivf_gemm with tiny lists, so the map tasks really split the IVF lists and query batches).
    Retrieval takes the sharded path too, but this embedder leaves no candidates after dedup, so
    only its reduce runs (the retrieval arrays are covered on the local executor)."""
    root, args = curation_world["root"], curation_world["args"]
    ivf = ["dedup.index.kind=ivf_gemm", "dedup.index.gemm_list_size=8", "dedup.index.search_batch=8",
           "dedup.index.gemm_query_batch=8", "dedup.index.gemm_train_per_centroid=4"]
    local = subprocess.Popen([PY, "-m", "curation.cli", "run", *args, *ivf, f"output_dir={root / 'gathered-ivf'}",
                              "executor.cluster=local", "sharding.mode=gathered"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    on_slurm = _curate([*args, *ivf, f"output_dir={root / 'sharded-ivf'}", "executor.cluster=slurm",
                        "sharding.mode=sharded", "sharding.block_items=1", "executor.cpus_per_task=1",
                        "executor.mem_gb=1", "executor.gather_cpus_per_task=1", "executor.gather_mem_gb=2"])
    out, err = local.communicate(timeout=600)
    assert local.returncode == 0, f"local curate run failed:\n{out[-3000:]}\n{err[-5000:]}"
    assert "dedup: sharded map → reduce" in on_slurm.stdout
    assert "retrieve: sharded search / assign arrays" in on_slurm.stdout
    ref, got = _stage_outputs(root / "gathered-ivf"), _stage_outputs(root / "sharded-ivf")
    assert sorted(got) == sorted(ref)
    differ = sorted(name for name in ref if got[name] != ref[name])
    assert not differ, f"sharded (SLURM) and gathered (local) outputs differ: {differ}"
    rows = _run(["sacct", "-n", "-X", "-P", "-S", "now-3600", "-o", "JobID,JobName,State"]).split()
    for step in ("dedup-assign", "dedup-search"):
        tasks = [r for r in rows if re.match(rf"^\d+_\d+\|{step}\|", r)]
        assert len(tasks) >= 4 and all(r.endswith("|COMPLETED") for r in tasks), (step, rows)
