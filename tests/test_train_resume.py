"""Kill-and-resume: ``dinov2 train`` killed with SIGKILL right after its step-4 checkpoint, then
restarted with the same command, ends with exactly the same weights, optimizer state, centers and
loss curve as an uninterrupted 8-step run (1 process, CPU, real tar shards through the real loader).
Also after batches the loader dropped (none of their images decoded): the checkpoint holds the
loader's true position, not steps × batch size."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train_distributed import CONFIG, REPO, tiny_overrides

from dinov2.train.checkpoint import read_checkpoint_tensors, read_meta
from dinov2.train.config import load_train_config
from dinov2.train.train import run_training


def _shards(root: Path) -> str:
    from skimage import data

    root.mkdir(parents=True)
    names = ["astronaut", "chelsea", "coffee", "rocket", "retina", "immunohistochemistry"]
    for s in range(2):
        with tarfile.open(root / f"train-{s:06d}.tar", "w") as tf:
            for i, name in enumerate(names):
                img = Image.fromarray(getattr(data, name)()).convert("RGB")
                img = img.resize((96 + 8 * i, 80 + 4 * s)).rotate(30 * s)
                p = root / f"{s}_{i}.jpg"
                img.save(p, quality=85)
                tf.add(p, arcname=f"img.{s}.{i:04d}.jpg")  # dotted keys on purpose
                p.unlink()
    return str(root / "train-{000000..000001}.tar")


def _cmd(out: Path, pattern: str) -> list[str]:
    overrides = tiny_overrides(out, 8) + [
        f'data.sources=[{{pattern: "{pattern}"}}]', "data.batch_size=4", "data.num_workers=1",
        "data.streams_per_rank=2", "data.shuffle_buffer=8", "model.drop_path_rate=0.2",  # RNG-dependent
    ]
    return [sys.executable, "-m", "dinov2.cli", "train", "-c", str(CONFIG), *overrides]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_gives_identical_weights(tmp_path):
    pattern = _shards(tmp_path / "shards")
    ref, killed = tmp_path / "ref", tmp_path / "killed"

    proc = subprocess.run(_cmd(ref, pattern), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    p = subprocess.Popen(_cmd(killed, pattern), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    marker = killed / "ckpt" / "step_000004" / "meta.json"
    deadline = time.time() + 240
    while not marker.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert marker.exists() and not (killed / "ckpt" / "step_000008").exists()

    proc = subprocess.run(_cmd(killed, pattern), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = read_checkpoint_tensors(ref / "ckpt" / "step_000008")
    b = read_checkpoint_tensors(killed / "ckpt" / "step_000008")
    assert a.keys() == b.keys()
    assert any(k.startswith("optimizer.state.") for k in a) and "centers.dino" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["total_loss"]) for r in rows]

    assert losses(ref) == losses(killed)
    assert [s for s, _ in losses(ref)] == list(range(1, 9))


def _mostly_undecodable_shard(root: Path) -> str:
    """16 samples, one real JPEG in four: at batch size 2 whole batches fail to decode."""
    from skimage import data

    root.mkdir(parents=True)
    names = ["astronaut", "chelsea", "coffee", "rocket"]
    with tarfile.open(root / "train-000000.tar", "w") as tf:
        for i in range(16):
            if i % 4 == 0:
                img = Image.fromarray(getattr(data, names[i // 4])()).convert("RGB").resize((96, 80))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
                payload = buf.getvalue()
            else:
                payload = b"\xff\xd8 not a jpeg " + bytes([i]) * 50
            info = tarfile.TarInfo(f"s{i:04d}.jpg")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return str(root / "train-000000.tar")


@pytest.mark.slow
def test_resume_after_dropped_batches_is_exact(tmp_path):
    pattern = _mostly_undecodable_shard(tmp_path / "shards")

    def overrides(out: Path) -> list[str]:
        return tiny_overrides(out, 8) + [
            f'data.sources=[{{pattern: "{pattern}"}}]', "data.batch_size=2", "data.num_workers=0",
            "data.streams_per_rank=1", "data.shuffle_buffer=4", "checkpoint.every_n_steps=1",
            "model.drop_path_rate=0.2"]

    ref = tmp_path / "ref"
    res = run_training(load_train_config(CONFIG, overrides(ref)))
    assert res.final_step == 8
    resume_at = 4
    meta = read_meta(ref / "ckpt" / f"step_{resume_at:06d}")
    row = next(r for r in res.metrics if r["step"] == resume_at)
    # Batches were dropped before the checkpoint, so the stream is ahead of steps × batch size.
    assert row["bad_images_empty_batch"] > 0
    assert meta["data_sample"] == meta["data_samples"][0] == (resume_at + row["bad_images_empty_batch"]) * 2

    # As if killed after the step-4 checkpoint: same folder without the later checkpoints.
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    for step in range(resume_at + 1, 9):
        shutil.rmtree(resumed / "ckpt" / f"step_{step:06d}")
    res2 = run_training(load_train_config(CONFIG, overrides(resumed)))
    assert (res2.start_step, res2.final_step) == (resume_at, 8)
    a = read_checkpoint_tensors(ref / "ckpt" / "step_000008")
    b = read_checkpoint_tensors(resumed / "ckpt" / "step_000008")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert read_meta(resumed / "ckpt" / "step_000008")["data_samples"] == \
        read_meta(ref / "ckpt" / "step_000008")["data_samples"]

    def rows(run):
        return [(r["step"], r["total_loss"], r["dino_loss"]) for r in
                map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert rows(resumed) == rows(ref)
