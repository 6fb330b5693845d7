"""Schedules, LR scaling and AdamW parameter groups of the trainer."""
import math

import pytest
import torch

from dinov2.models.head import DINOHead
from dinov2.models.vit import DinoVisionTransformer
from dinov2.train.param_groups import (
    ParamGroupRule,
    apply_schedule,
    build_param_groups,
    layer_id,
    param_multipliers,
)
from dinov2.train.schedules import CosineSchedule, LinearWarmupConstant, build_schedules, scaled_lr


def test_cosine_schedule_warmup_and_end_points():
    s = CosineSchedule(base_value=1.0, final_value=0.1, total_iters=110, warmup_iters=10, start_warmup_value=0.0)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(5 / 9)  # np.linspace(0, 1, 10)[5], as both references
    assert s(9) == pytest.approx(1.0)  # the ramp's last iteration reaches the peak
    assert s(10) == pytest.approx(1.0)  # first cosine iteration
    assert s(60) == pytest.approx(0.55)  # half-way through the cosine: mean of base and final
    assert s(109) == pytest.approx(0.1, abs=1e-3)
    assert s(500) == 0.1
    values = [s(i) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay after warmup


def test_cosine_schedule_freeze_and_bad_lengths():
    s = CosineSchedule(1.0, 0.0, 20, warmup_iters=0, freeze_iters=5)
    assert [s(i) for i in range(5)] == [0.0] * 5
    assert s(5) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0.0, 10, warmup_iters=8, freeze_iters=5)
    with pytest.raises(ValueError):
        CosineSchedule(1.0, 0.0, 0)


def test_teacher_temp_warmup():
    t = LinearWarmupConstant(0.04, 0.07, 30)
    assert t(0) == pytest.approx(0.04)
    assert t(15) == pytest.approx(0.04 + 0.03 * 15 / 29)  # np.linspace(0.04, 0.07, 30)[15]
    assert t(29) == t(30) == t(1000) == pytest.approx(0.07)


def test_lr_scaling_rule():
    assert scaled_lr(0.004, 1024) == pytest.approx(0.004)
    assert scaled_lr(0.004, 256) == pytest.approx(0.002)  # sqrt(1/4)
    assert scaled_lr(0.004, 4096) == pytest.approx(0.008)
    with pytest.raises(ValueError):
        scaled_lr(0.004, 256, "cubic")


def test_reference_schedules():
    """DINOv2 defaults: 100 epochs × 1250 it, warmup 10 epochs, WD 0.04→0.4, EMA 0.992→1,
    teacher temp 0.04→0.07 over 30 epochs, last layer frozen for the first epoch."""
    s = build_schedules(
        base_lr=0.004, min_lr=1e-6, global_batch=1024, lr_scaling="sqrt_wrt_1024", epochs=100, epoch_length=1250,
        warmup_epochs=10, freeze_last_layer_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
        momentum_teacher=0.992, final_momentum_teacher=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
    )
    total = 125_000
    assert s.lr(12_500) == pytest.approx(0.004)
    assert s.lr(total - 1) == pytest.approx(1e-6, abs=1e-8)
    assert s.wd(0) == pytest.approx(0.04) and s.wd(total) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(total) == pytest.approx(1.0)
    assert s.momentum(total // 2) == pytest.approx(0.996, abs=1e-6)
    assert s.teacher_temp(37_500) == pytest.approx(0.07)
    assert s.last_layer_lr(1249) == 0.0 and s.last_layer_lr(1250) == pytest.approx(s.lr(1250))


def _tiny_student():
    backbone = DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2)
    return torch.nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(32, 64, 16, 8)})


def test_layer_ids_and_multipliers():
    assert layer_id("backbone.cls_token", 12) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc2.bias", 12) == 12
    assert layer_id("backbone.norm.weight", 12) == 13
    assert layer_id("dino_head.mlp.0.weight", 12) == 13
    rule = ParamGroupRule(layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    p2 = torch.zeros(2, 2)
    m = param_multipliers("backbone.patch_embed.proj.weight", p2, 12, rule)
    assert m["lr_multiplier"] == pytest.approx(0.9**13 * 0.2) and m["wd_multiplier"] == 1.0
    m = param_multipliers("backbone.blocks.11.attn.qkv.weight", p2, 12, rule)
    assert m["lr_multiplier"] == pytest.approx(0.9) and m["wd_multiplier"] == 1.0
    for name in ("backbone.blocks.3.ls1.gamma", "backbone.blocks.3.norm1.weight", "backbone.blocks.3.attn.qkv.bias"):
        assert param_multipliers(name, p2, 12, rule)["wd_multiplier"] == 0.0, name
    # The DINOv2 reference decays the tokens (tests/test_fidelity.py pins the whole ViT-S/14 listing).
    tokens = ("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token", "backbone.register_tokens")
    for name in tokens:
        assert param_multipliers(name, p2, 12, rule)["wd_multiplier"] == 1.0, name
    old = ParamGroupRule(0.9, 0.2, "dinov2_and_tokens")
    for name in tokens:
        assert param_multipliers(name, p2, 12, old)["wd_multiplier"] == 0.0, name
    m = param_multipliers("dino_head.last_layer.weight", p2, 12, rule)
    assert m["is_last_layer"] and m["lr_multiplier"] == 1.0 and m["wd_multiplier"] == 1.0


def test_param_groups_cover_every_parameter_once_and_apply_schedule():
    student = _tiny_student()
    groups = build_param_groups(student.named_parameters(), 3, ParamGroupRule())
    names = [n for g in groups for n in g["names"]]
    assert sorted(names) == sorted(n for n, _ in student.named_parameters())
    assert len(names) == len(set(names))
    for g in groups:
        g.pop("names")
    opt = torch.optim.AdamW(groups, lr=0.0)
    apply_schedule(opt, lr=1e-3, wd=0.05, last_layer_lr=0.0)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(student.named_parameters())
    assert by_param[id(named["dino_head.last_layer.weight"])]["lr"] == 0.0  # frozen first epoch
    blk = by_param[id(named["backbone.blocks.2.attn.qkv.weight"])]
    assert blk["lr"] == pytest.approx(1e-3 * 0.9) and blk["weight_decay"] == pytest.approx(0.05)
    pe = by_param[id(named["backbone.patch_embed.proj.weight"])]
    assert pe["lr"] == pytest.approx(1e-3 * 0.9**4 * 0.2)
    assert by_param[id(named["backbone.blocks.0.ls1.gamma"])]["weight_decay"] == 0.0
    assert by_param[id(named["backbone.norm.bias"])]["weight_decay"] == 0.0
    head = by_param[id(named["dino_head.mlp.0.weight"])]
    assert head["lr"] == pytest.approx(1e-3) and math.isclose(head["weight_decay"], 0.05)
