"""Distillation: a frozen (larger) teacher trains a smaller student with the DINO/iBOT/KoLeo
objective; the student's EMA is what checkpoints hold and ``dinov2 export`` writes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_distributed import CONFIG, GSIZE, photo_batch_source, tiny_overrides

from dinov2.models.checkpoint import load_pretrained, save_official
from dinov2.models.vit import DinoVisionTransformer
from dinov2.train.build import build_optimizer
from dinov2.train.checkpoint import read_checkpoint_tensors
from dinov2.train.config import load_train_config
from dinov2.train.distill import load_frozen_teacher
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import run_training
from dinov2.utils.config import ConfigError


def _teacher_file(path: Path, patch: int = 14, dim: int = 96) -> Path:
    torch.manual_seed(123)
    save_official(DinoVisionTransformer(img_size=3 * patch, patch_size=patch, embed_dim=dim, depth=2, num_heads=3), path)
    return path


def test_frozen_teacher_student_ema_checkpoint_and_export(tmp_path):
    teacher_pth = _teacher_file(tmp_path / "teacher.pth")  # 96-dim teacher, 64-dim student
    ov = tiny_overrides(tmp_path / "run", 2) + [f"distill.teacher_checkpoint={teacher_pth}"]
    cfg = load_train_config(CONFIG, ov)

    # One step by hand: the frozen teacher gets no gradient and never moves; the student EMA does.
    torch.manual_seed(0)
    source = load_frozen_teacher(cfg, use_ibot=True, separate_ibot_head=False)
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, GSIZE, teacher_source=source)
    assert arch.frozen_teacher is source
    assert arch.frozen_teacher["backbone"].embed_dim == 96 and arch.teacher["backbone"].embed_dim == 64
    frozen0 = {k: v.clone() for k, v in arch.frozen_teacher.state_dict().items()}
    ema0 = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    opt = build_optimizer(arch, cfg)
    assert not any(p.requires_grad for p in arch.frozen_teacher.parameters())
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in arch.frozen_teacher.parameters()}
    for p in opt.param_groups:
        p["lr"] = 1e-3
    batch = next(iter(photo_batch_source()(0, 1, 0)))
    out = arch.forward_loss(batch, 0.04)
    out.loss.backward()
    opt.step()
    arch.update_teacher(0.9)
    assert all(torch.equal(v, frozen0[k]) for k, v in arch.frozen_teacher.state_dict().items())
    assert not torch.equal(arch.teacher.state_dict()["backbone.blocks.0.attn.qkv.weight"],
                           ema0["backbone.blocks.0.attn.qkv.weight"])
    assert np.isfinite(float(out.loss.detach())) and set(out.terms) >= {"dino_loss", "ibot_loss", "koleo_loss"}

    # A real run: checkpoints hold the student and its EMA (64-dim), never the frozen teacher.
    res = run_training(cfg, batch_source=photo_batch_source())
    assert res.final_step == 2
    t = read_checkpoint_tensors(res.last_checkpoint, "teacher.backbone.")
    s = read_checkpoint_tensors(res.last_checkpoint, "student.backbone.")
    assert t["cls_token"].shape[-1] == 64 and t.keys() == s.keys()
    assert not torch.equal(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])
    from dinov2.cli import main

    # .safetensors: records the student's 2 heads (width 64 defaults to 1; a .pth is refused).
    assert main(["export", str(res.run_dir), str(tmp_path / "student_ema.safetensors")]) == 0
    exported = load_pretrained(str(tmp_path / "student_ema.safetensors"))
    assert exported.embed_dim == 64 and exported.num_heads == 2
    assert torch.equal(exported.state_dict()["blocks.0.attn.qkv.weight"], t["blocks.0.attn.qkv.weight"])


def test_teacher_heads_modes_and_errors(tmp_path):
    teacher_pth = _teacher_file(tmp_path / "teacher.pth")
    base = tiny_overrides(tmp_path / "run", 2)
    cfg = load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={teacher_pth}"])
    # Backbone-only file → seeded frozen random heads, identical on every (re)start.
    a = load_frozen_teacher(cfg, use_ibot=True, separate_ibot_head=False)
    b = load_frozen_teacher(cfg, use_ibot=True, separate_ibot_head=True)
    assert torch.equal(a["dino_head"].head.mlp[0].weight, b["dino_head"].head.mlp[0].weight)
    assert b["ibot_head"].out_dim == cfg.head.ibot_out_dim and "ibot_head" not in a
    # The random heads see batch-standardised features, CLS rows and patch rows each on their own.
    from dinov2.train.distill import batch_standardize

    x = torch.cat([torch.randn(6, 96) * 4 + 2, torch.randn(10, 96) - 5])
    cls_part, patch_part = a["dino_head"](x, split_at=6)
    ref = a["dino_head"].head(torch.cat([batch_standardize(x[:6]), batch_standardize(x[6:])]), split_at=6)
    torch.testing.assert_close((cls_part, patch_part), ref)
    torch.testing.assert_close(a["dino_head"](x[:6] * 10 - 3), cls_part, atol=1e-4, rtol=1e-4)  # affine-invariant

    # Heads from one of our training runs (the reference setting): loaded, not random.
    run = tmp_path / "teacher_run"
    res = run_training(load_train_config(CONFIG, tiny_overrides(run, 1)), batch_source=photo_batch_source())
    heads = read_checkpoint_tensors(res.last_checkpoint, "teacher.dino_head.")
    for mode in ("auto", "checkpoint"):
        cfg2 = load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={run}", f"distill.teacher_heads={mode}"])
        t = load_frozen_teacher(cfg2, use_ibot=True, separate_ibot_head=False)
        assert torch.equal(t["dino_head"].mlp[0].weight, heads["mlp.0.weight"])
    # Prototype count mismatch with heads=checkpoint: a clear error.
    cfg3 = load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={run}", "distill.teacher_heads=checkpoint",
                                             "head.dino_out_dim=128"])
    with pytest.raises(ValueError, match="prototypes"):
        load_frozen_teacher(cfg3, use_ibot=True, separate_ibot_head=False)

    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={tmp_path / 'nope.pth'}"])
    with pytest.raises(ConfigError, match="needs a run or checkpoint folder"):
        load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={teacher_pth}", "distill.teacher_heads=checkpoint"])
    with pytest.raises(ConfigError, match="teacher_heads"):
        load_train_config(CONFIG, base + ["distill.teacher_heads=trained"])
    p16 = _teacher_file(tmp_path / "teacher16.pth", patch=16)
    with pytest.raises(ValueError, match="patch size"):
        load_frozen_teacher(load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={p16}"]), True, False)
