"""Run folders are untrusted input, damaged ones are survived, one writer at a time (issue 13).

Every crafted file here would create a marker file if anything unpickled it; the tests check the
marker never appears and that the refusal is one line with exit status 2.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_distributed import CONFIG, REPO, run, tiny_overrides

from dinov2.train.checkpoint import CheckpointError, list_checkpoints, read_checkpoint_tensors
from dinov2.utils.safe_dcp import SafeLoadPlanner, UnsafeCheckpointError
from dinov2.utils.config import ConfigError
from dinov2.utils.lock import FolderLock, FolderLocked


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """4 steps, checkpoints at steps 2 and 4 (kept)."""
    out = tmp_path_factory.mktemp("trust") / "run"
    run(out, 4)
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000004"]
    return out


def _copy(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _cli(*args: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DINOV2_TRACEBACK", None)
    proc = subprocess.run([sys.executable, "-m", "dinov2.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc.returncode, proc.stderr


def _assert_one_line_refusal(rc: int, err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip() and " INFO " not in ln and " WARNING " not in ln]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_crafted_dcp_metadata_never_runs(trained, tmp_path):
    out = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    (out / "ckpt" / "step_000004" / ".metadata").write_bytes(pickle.dumps(_WritesMarker(marker)))
    rc, err = _cli("export", str(out), str(tmp_path / "w.safetensors"))
    _assert_one_line_refusal(rc, err, ".metadata", "open")
    with pytest.raises(UnsafeCheckpointError):
        read_checkpoint_tensors(out, "teacher.backbone.")
    with pytest.raises(UnsafeCheckpointError):  # resume refuses it too
        run(out, 6)
    assert not marker.exists()
    assert not (tmp_path / "w.safetensors").exists()


def test_crafted_rng_file_never_runs(trained, tmp_path):
    out = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "torch": _WritesMarker(marker)}, out / "ckpt" / "step_000004" / "rng_rank0.pt")
    with pytest.raises(UnsafeCheckpointError, match="rng_rank0.pt"):
        run(out, 6)
    assert not marker.exists()


def test_crafted_checkpoint_item_never_runs(tmp_path):
    """Non-tensor DCP items (optimizer hyper-parameters) go through weights_only too."""
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save({"lr": _WritesMarker(marker)}, buf)
    buf.seek(0)

    class _Item:
        class dest_index:
            fqn = "optimizer.param_groups"

    with pytest.raises(UnsafeCheckpointError, match="optimizer.param_groups"):
        SafeLoadPlanner().load_bytes(_Item(), buf)
    assert not marker.exists()


def test_rng_state_is_weights_only(trained):
    state = torch.load(trained / "ckpt" / "step_000004" / "rng_rank0.pt", weights_only=True)
    assert state["format"] == 2 and state["torch"].dtype == torch.uint8


def _truncate_newest_shard(out: Path) -> Path:
    shard = sorted((out / "ckpt" / "step_000004").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return shard


def test_truncated_newest_checkpoint_falls_back_to_intact_one(trained, tmp_path, caplog):
    out = _copy(trained, tmp_path)
    shard = _truncate_newest_shard(out)
    with caplog.at_level(logging.WARNING):
        res = run(out, 6)
    assert res.start_step == 2 and res.final_step == 6
    assert "step_000004" in caplog.text and "truncated" in caplog.text
    # Naming the damaged step folder explicitly: one line naming the file, exit 2.
    out2 = _copy(trained, tmp_path / "b")
    shard = _truncate_newest_shard(out2)
    rc, err = _cli("export", str(out2 / "ckpt" / "step_000004"), str(tmp_path / "w.safetensors"))
    _assert_one_line_refusal(rc, err, shard.name, "truncated")
    # The run folder itself exports from the newest intact step.
    rc, err = _cli("export", str(out2), str(tmp_path / "w.safetensors"))
    assert rc == 0, err
    assert (tmp_path / "w.safetensors").is_file()


def test_truncated_metadata_everywhere_is_an_error_not_a_fresh_start(trained, tmp_path):
    out = _copy(trained, tmp_path)
    for ck in list_checkpoints(out):
        md = ck / ".metadata"
        md.write_bytes(md.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        run(out, 6)
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000004"]


@pytest.mark.parametrize("change,key", [("model.num_heads=4", "model.num_heads"), ("model.depth=3", "model.depth"),
                                        ("head.dino_out_dim=128", "head.dino_out_dim")])
def test_changed_architecture_on_resume_is_refused_before_touching(trained, tmp_path, change, key):
    out = _copy(trained, tmp_path)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(ConfigError, match=key):
        run(out, 6, [change])
    after = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"}
    before.pop(out / ".lock", None)
    assert after == before, "a refused resume changed the run folder"


def test_changed_learning_rate_on_resume_is_allowed(trained, tmp_path):
    out = _copy(trained, tmp_path)
    res = run(out, 6, ["optim.base_lr=0.005"])
    assert res.start_step == 4 and res.final_step == 6


def test_second_run_on_a_locked_folder_is_refused(trained, tmp_path):
    out = _copy(trained, tmp_path)
    with FolderLock(out, "test holder"):
        with pytest.raises(FolderLocked, match="in use by pid"):
            run(out, 6)
        args = ["train", "-c", str(CONFIG), *tiny_overrides(out, 6)]
        rc, err = _cli(*args)
        _assert_one_line_refusal(rc, err, "in use by pid", "test holder")
    assert [p.name for p in list_checkpoints(out)] == ["step_000002", "step_000004"]


def test_lock_of_a_killed_holder_is_not_stale(tmp_path):
    folder = tmp_path / "f"
    code = ("import sys, time; from dinov2.utils.lock import FolderLock; "
            f"FolderLock({str(folder)!r}, 'sleeper').acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(FolderLocked, match="sleeper"):
        FolderLock(folder).acquire()
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.time() + 10
    while True:  # the kernel drops the flock with the process
        try:
            FolderLock(folder).acquire().release()
            break
        except FolderLocked:
            assert time.time() < deadline, "a SIGKILLed holder's lock was never released"
            time.sleep(0.1)


def test_lock_is_free_once_its_holder_dies_though_a_forked_worker_lives_on(tmp_path):
    # A data-loader worker shares the holder's open file; it outlives a SIGKILLed trainer by seconds.
    folder = tmp_path / "f"
    code = ("import multiprocessing as mp, os, time; from dinov2.utils.lock import FolderLock; "
            f"lock = FolderLock({str(folder)!r}, 'trainer').acquire(); "
            "child = mp.get_context('fork').Process(target=time.sleep, args=(60,)); child.start(); "
            "print(child.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(proc.stdout.readline())
    try:
        with pytest.raises(FolderLocked, match="trainer"):
            FolderLock(folder).acquire()
        proc.kill()
        proc.wait(timeout=30)
        os.kill(child, 0)  # the worker is still alive ...
        FolderLock(folder).acquire().release()  # ... and the folder is free at once
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def test_outputs_respect_the_umask(trained, tmp_path):
    old = os.umask(0o027)
    try:
        from dinov2.cli import main

        assert main(["export", str(trained), str(tmp_path / "w.safetensors")]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o640
    assert (trained / "config.yaml").stat().st_mode & 0o777 == 0o666 & ~old


def test_file_system_errors_are_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc, err = _cli("train", "-c", str(CONFIG), *tiny_overrides(blocker, 2))
    _assert_one_line_refusal(rc, err, "not a folder")
    rc, err = _cli("export", str(tmp_path / "nothing_here"), str(tmp_path / "w.safetensors"))
    _assert_one_line_refusal(rc, err, "nothing_here")


@pytest.mark.parametrize("ks", [["0"], ["-3"], ["10", "0"]])
def test_knn_rejects_non_positive_k(tmp_path, ks):
    rc, err = _cli("eval", "knn", "--weights", "w.safetensors", "--train-dir", str(tmp_path), "--val-dir", str(tmp_path),
                   "--ks", *ks)
    assert rc == 2 and "--ks" in err and "must be >= 1" in err and "Traceback" not in err


def test_knn_rejects_k_zero_in_the_library():
    from dinov2.eval.knn import knn_accuracy

    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="k >= 1"):
        knn_accuracy(x, y, x, y, ks=[0])
    with pytest.raises(ValueError, match="empty evaluation set"):
        knn_accuracy(x, y, x[:0], y[:0], ks=[1])


def test_bad_eval_folder_fails_before_the_run_folder_is_made(tmp_path):
    labeled = tmp_path / "labeled"
    (labeled / "a").mkdir(parents=True)
    (labeled / "b").mkdir()
    with pytest.raises(ConfigError, match="eval.train_dir"):
        run(tmp_path / "r", 2, ["eval.every_n_steps=1", f"eval.train_dir={labeled}",
                                f"eval.val_dir={tmp_path / 'nope'}"])
    assert not (tmp_path / "r").exists()
