"""High-resolution finishing phase: a 4 + 2 step run (tiny ViT, CPU, real tar shards through the
real loader) continues the same metrics / checkpoints at larger crops, exports a backbone that runs
on 518 px inputs, keeps the loss continuous across the phase switch, and resumes inside phase 2
with exactly the weights of the uninterrupted run."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from test_train_distributed import CONFIG, tiny_overrides
from test_train_resume import _shards

from dinov2.train.checkpoint import list_checkpoints, read_checkpoint_tensors, read_meta
from dinov2.train.config import load_train_config
from dinov2.train.phases import HIGHRES, MAIN, plans
from dinov2.train.train import run_training
from dinov2.utils.config import ConfigError

N_MAIN, N_HIGH = 8, 4
HIGH_GLOBAL, HIGH_LOCAL = 70, 28  # main phase: 42 / 28 (tiny_overrides)
K = 3  # steps averaged on each side of the phase switch
# Bound on |mean DINO loss of phase 2's first K steps - mean of phase 1's last K| / mean of phase 1's
# last K (observed +18 % here; step-to-step noise inside phase 1 at batch 4 is of the same order).
# The DINO (image-level) term is the one compared: the iBOT term's value depends on the patch grid
# itself (on a 3x3 grid the mask generator masks far fewer images than on 5x5, and images without
# masked patches add 0), so the total loss steps up by construction at the switch.
MAX_REL_JUMP = 0.30


def _overrides(out, pattern, extra=()):
    return tiny_overrides(out, N_MAIN) + [
        f'data.sources=[{{pattern: "{pattern}"}}]', "data.batch_size=4", "data.num_workers=0",
        "data.streams_per_rank=2", "data.shuffle_buffer=8", "checkpoint.every_n_steps=1", "checkpoint.keep_last=0",
        f"phases.highres.steps={N_HIGH}", f"phases.highres.global_crops_size={HIGH_GLOBAL}",
        f"phases.highres.local_crops_size={HIGH_LOCAL}", "phases.highres.warmup_steps=1",
        "phases.highres.base_lr=0.005", *extra,
    ]


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_plans_and_validation(tmp_path):
    cfg = load_train_config(CONFIG, tiny_overrides(tmp_path, 10) + [
        "phases.highres.steps=3", "phases.highres.global_crops_size=70", "phases.highres.batch_size=3",
        "phases.highres.warmup_steps=1", "phases.highres.base_lr=0.004"])
    (p1, _c1), (p2, c2) = plans(cfg, world_size=1)
    assert (p1.name, p1.start_step, p1.end_step) == (MAIN, 0, 10)
    assert (p2.name, p2.start_step, p2.end_step) == (HIGHRES, 10, 13)
    # Phase 2 keeps the position grid of phase 1 (same parameter shapes) at larger crops.
    assert c2.model.img_size == 42 and c2.data.crops.global_crops_size == 70 and c2.data.batch_size == 3
    # The data stream continues at the next batch boundary after the main phase's final position
    # (10 steps × 8 samples when no batch was dropped): ceil(80 / 3) * 3 = 81.
    assert p2.first_sample(80) == 81 and p2.first_sample(81) == 81
    v = [p2.schedules.values(s) for s in range(10, 13)]
    assert v[0]["lr"] == 0.0 and v[1]["lr"] == pytest.approx(0.004)  # tiny.yaml: lr_scaling none
    assert v[2]["lr"] < v[1]["lr"] and all(x["last_layer_lr"] == x["lr"] for x in v)
    assert v[0]["momentum"] <= v[2]["momentum"] <= 1.0

    # Default size: 1.5 × the main crop, rounded to the patch (42 → 70; tiny.yaml's 84 → 126).
    (_, d2), = plans(load_train_config(CONFIG, tiny_overrides(tmp_path, 10) + ["phases.highres.steps=1"]), 1)[1:]
    assert d2.data.crops.global_crops_size == 70 and d2.data.crops.local_crops_size == 28
    tiny = load_train_config(CONFIG, [f"train.output_dir={tmp_path}", "phases.highres.steps=1"])
    assert plans(tiny, 1)[1][1].data.crops.global_crops_size == 126

    for bad, why in ((["phases.highres.steps=2", "phases.highres.global_crops_size=50"], "multiple"),
                     (["phases.highres.steps=2", "phases.highres.warmup_steps=3"], "warmup_steps"),
                     (["phases.highres.steps=2", "checkpoint.save_final=false"], "save_final")):
        with pytest.raises(ConfigError, match=why):
            load_train_config(CONFIG, tiny_overrides(tmp_path, 4) + bad)


@pytest.mark.slow
def test_two_phase_run_export_518_loss_continuity_and_resume_in_phase2(tmp_path):
    pattern = _shards(tmp_path / "shards")
    out = tmp_path / "run"
    cfg = load_train_config(CONFIG, _overrides(out, pattern))
    res = run_training(cfg)
    assert (res.start_step, res.final_step) == (0, N_MAIN + N_HIGH)

    rows = [r for r in _rows(out) if "total_loss" in r]
    assert [r["step"] for r in rows] == list(range(1, N_MAIN + N_HIGH + 1))
    assert [r["phase"] for r in rows] == [MAIN] * N_MAIN + [HIGHRES] * N_HIGH
    assert all(np.isfinite(r["total_loss"]) for r in rows)
    # Phase 2's own LR schedule: warmup from 0, then the peak.
    assert rows[N_MAIN]["lr"] == 0.0 and rows[N_MAIN + 1]["lr"] == pytest.approx(0.005)

    # Checkpoints: one folder, step numbers continue, tagged by phase; phase 2 config at high res.
    names = [p.name for p in list_checkpoints(out)]
    assert names == [f"step_{s:06d}" for s in range(1, N_MAIN + N_HIGH + 1)]
    last = read_meta(out / "ckpt" / f"step_{N_MAIN + N_HIGH:06d}")
    assert last["phase"] == HIGHRES and read_meta(out / "ckpt" / f"step_{N_MAIN:06d}")["phase"] == MAIN
    # Phase 2's stream starts at the next batch after phase 1's 4 × 4 samples.
    assert last["data_sample"] == N_MAIN * 4 + N_HIGH * 4
    hcfg = (out / "config.highres.yaml").read_text()
    assert f"global_crops_size: {HIGH_GLOBAL}" in hcfg and "global_crops_size: 42" in (out / "config.yaml").read_text()

    # Loss continuity across the switch.
    before = np.mean([r["dino_loss"] for r in rows[N_MAIN - K:N_MAIN]])
    after = np.mean([r["dino_loss"] for r in rows[N_MAIN:N_MAIN + K]])
    rel = abs(after - before) / before
    print(f"dino loss: last {K} of phase 1 = {before:.4f}, first {K} of phase 2 = {after:.4f}, rel jump {rel:.3f}")
    assert rel <= MAX_REL_JUMP
    # Phase 2 starts from phase 1's weights: its first step has LR 0 (warmup), so the student is
    # bit-identical to the step-N checkpoint, while the EMA teacher still moves.
    sN = read_checkpoint_tensors(out / "ckpt" / f"step_{N_MAIN:06d}", "student.")
    sN1 = read_checkpoint_tensors(out / "ckpt" / f"step_{N_MAIN + 1:06d}", "student.")
    assert all(torch.equal(sN[k], sN1[k]) for k in sN)
    tN = read_checkpoint_tensors(out / "ckpt" / f"step_{N_MAIN:06d}", "teacher.backbone.")
    tN1 = read_checkpoint_tensors(out / "ckpt" / f"step_{N_MAIN + 1:06d}", "teacher.backbone.")
    assert not torch.equal(tN["blocks.0.attn.qkv.weight"], tN1["blocks.0.attn.qkv.weight"])

    # Export the final teacher backbone; it runs on a 1×3×518×518 image.
    from dinov2.cli import main
    from dinov2.models.checkpoint import load_pretrained

    pth = tmp_path / "final.safetensors"  # records the run's 2 heads (a .pth cannot: refused)
    assert main(["export", str(out), str(pth)]) == 0
    model = load_pretrained(str(pth))
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 518, 518))
    assert feats.shape == (1, 64) and torch.isfinite(feats).all()

    # Resume inside phase 2: drop the last two checkpoints (as if killed during step N+3) and rerun.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for s in (N_MAIN + N_HIGH - 1, N_MAIN + N_HIGH):
        shutil.rmtree(resumed / "ckpt" / f"step_{s:06d}")
    res2 = run_training(load_train_config(CONFIG, _overrides(resumed, pattern)))
    assert (res2.start_step, res2.final_step) == (N_MAIN + N_HIGH - 2, N_MAIN + N_HIGH)
    a = read_checkpoint_tensors(out / "ckpt" / f"step_{N_MAIN + N_HIGH:06d}")
    b = read_checkpoint_tensors(resumed / "ckpt" / f"step_{N_MAIN + N_HIGH:06d}")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [(r["step"], r["phase"], r["total_loss"]) for r in _rows(resumed) if "total_loss" in r] == \
        [(r["step"], r["phase"], r["total_loss"]) for r in rows]

    # A finished run started again does nothing.
    res3 = run_training(load_train_config(CONFIG, _overrides(resumed, pattern)))
    assert res3.final_step == N_MAIN + N_HIGH and len(list_checkpoints(resumed)) == N_MAIN + N_HIGH
