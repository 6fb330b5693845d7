"""2-process CPU (gloo) FSDP2 training vs 1 process on the same global batches; resume on a
different world size.

The batches come from a deterministic source of real photos (scikit-image samples) that yields,
for step j, the same *global* batch whatever the world size, each rank taking its slice.  KoLeo is
off here because it is computed per rank (on the local batch, as in the reference), and drop path is
off; everything else — Sinkhorn-Knopp centering (all-reduced), DINO + iBOT losses, gradient
averaging, global grad-norm clipping, AdamW, EMA — must then give the same loss curve:
tolerance rtol 1e-4 on every logged loss (fp32; observed differences are ~1e-6).

This file is also the worker script: ``torchrun --nproc_per_node 2 tests/test_train_distributed.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "tiny.yaml"

GLOBAL_BATCH = 8
N_LOCAL = 2
GSIZE, LSIZE, PATCH = 42, 28, 14


def tiny_overrides(out_dir: str | Path, steps: int, extra: list[str] = (), world_size: int = 1) -> list[str]:
    """A very small model on 42 px / 28 px crops: a few hundred ms per step on a busy CPU."""
    return [
        f"train.output_dir={out_dir}", f"optim.max_steps={steps}", "train.progress=false", "train.tensorboard=false",
        "model.depth=2", "model.embed_dim=64", "model.num_heads=2", "model.drop_path_rate=0.0",
        "head.dino_out_dim=256", "head.dino_hidden_dim=64", "head.dino_bottleneck_dim=32", "head.ibot_out_dim=256",
        "optim.epoch_length=4", "optim.epochs=5", "optim.warmup_epochs=1", "optim.freeze_last_layer_epochs=0.5",
        "optim.base_lr=0.01", f"data.batch_size={GLOBAL_BATCH // world_size}", f"data.crops.global_crops_size={GSIZE}",
        f"data.crops.local_crops_size={LSIZE}", f"data.crops.local_crops_number={N_LOCAL}",
        "checkpoint.every_n_steps=2", "checkpoint.keep_last=0", *extra,
    ]


def _photos() -> list[torch.Tensor]:
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"):
        img = getattr(data, name)()
        if img.ndim == 3 and img.shape[2] == 3:
            out.append(torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0)
    return out


def photo_batch_source(global_batch: int = GLOBAL_BATCH, n_local: int = N_LOCAL, seed: int = 0,
                       nan_at_step: int | None = None):
    """f(rank, world_size, start_sample) -> batches; step j's global batch does not depend on the
    world size.  ``nan_at_step``: that step's images are NaN (divergence test)."""
    photos = _photos()
    n_patches = (GSIZE // PATCH) ** 2

    def crop(g: torch.Generator, img: torch.Tensor, size: int, lo: float, hi: float) -> torch.Tensor:
        _, H, W = img.shape
        side = int(min(H, W) * (lo + (hi - lo) * torch.rand((), generator=g).item()))
        y = int(torch.randint(0, H - side + 1, (), generator=g))
        x = int(torch.randint(0, W - side + 1, (), generator=g))
        patch = img[:, y : y + side, x : x + side][None]
        out = F.interpolate(patch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
        if torch.rand((), generator=g) < 0.5:
            out = out.flip(-1)
        return (out - 0.45) / 0.25

    def source(rank: int, world_size: int, start_sample: int):
        b = global_batch // world_size
        step = start_sample // b
        while True:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            gl, lo, mk = [], [], []
            for _ in range(global_batch):
                img = photos[int(torch.randint(0, len(photos), (), generator=g))]
                gl.append(torch.stack([crop(g, img, GSIZE, 0.4, 1.0) for _ in range(2)]))
                lo.append(torch.stack([crop(g, img, LSIZE, 0.1, 0.4) for _ in range(n_local)]))
                masked = torch.rand(2, generator=g) < 0.5
                m = (torch.rand(2, n_patches, generator=g) < 0.4) & masked[:, None]
                mk.append(m)
            sl = slice(rank * b, (rank + 1) * b)
            glb, lob, mkb = torch.stack(gl)[sl], torch.stack(lo)[sl], torch.stack(mk)[sl]
            # Collated layout is crop-major: [crop0 of every sample, crop1 of every sample, ...].
            batch = {
                "collated_global_crops": glb.transpose(0, 1).reshape(2 * b, 3, GSIZE, GSIZE),
                "collated_local_crops": lob.transpose(0, 1).reshape(n_local * b, 3, LSIZE, LSIZE),
                "collated_masks": mkb.transpose(0, 1).reshape(2 * b, n_patches),
            }
            if nan_at_step is not None and step + 1 == nan_at_step:
                batch["collated_global_crops"] = torch.full_like(batch["collated_global_crops"], float("nan"))
            yield batch
            step += 1

    return source


def run(out_dir: str | Path, steps: int, extra: list[str] = (), **source_kw):
    from dinov2.train.config import load_train_config
    from dinov2.train.train import run_training

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_train_config(CONFIG, tiny_overrides(out_dir, steps, list(extra), world_size))
    return run_training(cfg, batch_source=photo_batch_source(**source_kw))


def _losses(run_dir: Path) -> dict[int, dict[str, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: r[k] for k in ("dino_loss", "ibot_loss", "total_loss")} for r in rows if "total_loss" in r}


def _torchrun(out_dir: Path, steps: int, extra: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(Path(__file__)), "--out", str(out_dir), "--steps", str(steps), *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


NO_KOLEO = ["loss.koleo_weight=0", "loss.centering=sinkhorn_knopp"]


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process_and_resumes_on_other_world_size(tmp_path):
    one, two = tmp_path / "ws1", tmp_path / "ws2"
    run(one, 4, NO_KOLEO)
    _torchrun(two, 4, NO_KOLEO)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        for k in l1[step]:
            assert l2[step][k] == pytest.approx(l1[step][k], rel=1e-4), (step, k, l1[step][k], l2[step][k])
    assert json.loads((two / "ckpt" / "step_000004" / "meta.json").read_text())["world_size"] == 2

    # The teachers agree too (FSDP shards gathered by DCP).
    from dinov2.train.checkpoint import load_teacher_backbone_state

    t1, t2 = load_teacher_backbone_state(one), load_teacher_backbone_state(two)
    assert t1.keys() == t2.keys()
    for k in t1:
        torch.testing.assert_close(t2[k], t1[k], rtol=1e-4, atol=1e-5)

    # Resume the 2-process run on 1 process (DCP reshards model + optimizer): it continues the same
    # trajectory as the uninterrupted 1-process run.
    cont = tmp_path / "ws1_cont"
    shutil.copytree(one, cont)
    two_to_one = tmp_path / "ws2_to_ws1"
    shutil.copytree(two, two_to_one)
    assert run(cont, 6, NO_KOLEO).start_step == 4
    assert run(two_to_one, 6, NO_KOLEO).start_step == 4
    ref, other = _losses(cont), _losses(two_to_one)
    assert sorted(other) == [1, 2, 3, 4, 5, 6]
    for step in (5, 6):
        for k in ref[step]:
            assert other[step][k] == pytest.approx(ref[step][k], rel=1e-4), (step, k)


def _worker_main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("extra", nargs="*")
    args = ap.parse_args()
    from dinov2.train.distributed import destroy, init_distributed

    init_distributed("cpu")
    try:
        run(args.out, args.steps, args.extra)
    finally:
        destroy()


if __name__ == "__main__":
    _worker_main()
