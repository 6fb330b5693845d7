"""The shipped reference configs against the reference implementations' rules (docs/fidelity.md).

Each test restates a reference rule as a formula (facts from the DINOv2 / DINO code, not their code)
and checks the project's behaviour under the shipped config against it: parameter groups of a
ViT-S/14, the heads' initial prototypes, the last-layer freeze seen from AdamW's state, the
clipping rule, and the schedules.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_train_distributed import (
    CONFIG,
    GSIZE,
    NO_KOLEO,
    _losses,
    _torchrun,
    photo_batch_source,
    run,
    tiny_overrides,
)

from dinov2.train.config import load_train_config
from dinov2.train.param_groups import (
    ParamGroupRule,
    apply_last_layer_freeze,
    apply_schedule,
    build_param_groups,
    param_multipliers,
)
from dinov2.train.ssl_meta_arch import SSLMetaArch, clip_per_parameter_
from dinov2.train.build import build_optimizer
from dinov2.train.schedules import schedules_for as make_schedules

CONFIGS = CONFIG.parent
DINOV2 = ["vits14", "vitb14", "vitl14", "vitg14"]
DINO = ["dino_vits16", "dino_vitb8"]


def _cfg(name: str, tmp_path, extra=()):
    return load_train_config(CONFIGS / f"{name}.yaml", [f"train.output_dir={tmp_path}", *extra])


# ------------------------------------------------------------------------ what each config ships
@pytest.mark.parametrize("name", DINOV2 + DINO)
def test_reference_configs_pin_the_reference_mechanics(name, tmp_path):
    cfg = _cfg(name, tmp_path)
    dino = name in DINO
    assert cfg.optim.clip_grad == 3.0
    assert cfg.optim.clip_grad_rule == ("per_parameter" if dino else "per_module")
    assert cfg.optim.freeze_last_layer_epochs == 1
    assert cfg.optim.freeze_last_layer_mode == ("drop_grad" if dino else "lr_zero")
    assert cfg.optim.wd_exemption == ("dino" if dino else "dinov2")
    assert cfg.head.last_layer_init == "linear_default"
    # DINOv2 always trains weight_g; DINO's README sets norm_last_layer=False for vit_small only.
    assert cfg.head.last_layer_gain == ("fixed" if name == "dino_vitb8" else "learned")
    assert cfg.loss.teacher_temp_warmup == ("per_epoch" if dino else "per_iteration")
    assert cfg.model.cls_token_init == ("trunc_normal" if dino else "small_normal")
    assert cfg.model.drop_path_uniform is (not dino)  # DINO: linear 0 -> rate over depth
    crops = cfg.data.crops
    # DINOv2's GaussianBlur hands RandomApply 1 - p; DINO applies p as written.
    blur = (1.0, 0.1, 0.5) if dino else (0.0, 0.9, 0.5)
    assert (crops.blur_p_global1, crops.blur_p_global2, crops.blur_p_local) == blur
    assert crops.solarize_p_global2 == 0.2 and crops.color_jitter_p == 0.8 and crops.grayscale_p == 0.2
    assert list(crops.global_crops_scale) == ([0.4, 1.0] if dino else [0.32, 1.0])
    assert list(crops.local_crops_scale) == ([0.05, 0.4] if dino else [0.05, 0.32])
    assert cfg.optim.lr_scaling == ("linear_wrt_256" if dino else "sqrt_wrt_1024")
    assert cfg.optim.layerwise_decay == (0.9 if name in ("vits14", "vitb14") else 1.0)
    assert cfg.optim.patch_embed_lr_mult == (1.0 if dino else 0.2)
    if name in ("vitl14", "vitg14"):
        assert cfg.model.ffn_layer == "swiglufused"  # both reference training configs


# ------------------------------------------------------------------------ parameter groups
def _dinov2_reference_multipliers(module: str, name: str, ndim: int, num_layers: int, decay: float, pe: float):
    """The DINOv2 rule, per student module: layer 0 for the embeddings, i + 1 for block i, L + 1 for the
    rest (heads: L + 1 of L = 0 blocks, i.e. multiplier 1); no decay for ".bias" / "norm" / "gamma"."""
    if module == "backbone":
        if any(t in name for t in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
            lid = 0
        elif name.startswith("blocks."):
            lid = int(name.split(".")[1]) + 1
        else:
            lid = num_layers + 1
        lr = decay ** (num_layers + 1 - lid)
    else:
        lr = 1.0
    if "patch_embed" in name:
        lr *= pe
    wd = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
    return lr, wd, "last_layer" in name


def test_vits14_param_groups_follow_the_dinov2_rule(tmp_path):
    cfg = _cfg("vits14", tmp_path, ["model.num_register_tokens=4"])
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, 224)
    groups = build_param_groups(arch.student.named_parameters(), arch.num_layers,
                                ParamGroupRule(cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult,
                                               cfg.optim.wd_exemption))
    got = {n: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups for n in g["names"]}
    named = dict(arch.student.named_parameters())
    assert sorted(got) == sorted(named)
    for full, p in named.items():
        module, name = full.split(".", 1)
        lr, wd, last = _dinov2_reference_multipliers(module, name, p.ndim, 12, 0.9, 0.2)
        assert got[full][0] == pytest.approx(lr, rel=1e-12), full
        assert got[full][1:] == (wd, last), full
    # The values, spelled out: tokens decay, gammas / norms / biases do not, the gain decays.
    for name in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
        assert got[f"backbone.{name}"] == (pytest.approx(0.9**13), 1.0, False)
    assert got["backbone.patch_embed.proj.weight"] == (pytest.approx(0.9**13 * 0.2), 1.0, False)
    assert got["backbone.patch_embed.proj.bias"] == (pytest.approx(0.9**13 * 0.2), 0.0, False)
    assert got["backbone.blocks.0.attn.qkv.weight"] == (pytest.approx(0.9**12), 1.0, False)
    assert got["backbone.blocks.11.ls2.gamma"] == (pytest.approx(0.9), 0.0, False)
    assert got["backbone.norm.weight"] == (1.0, 0.0, False)
    assert got["dino_head.mlp.0.weight"] == (1.0, 1.0, False)
    assert got["dino_head.last_layer.weight"] == (1.0, 1.0, True)
    assert got["dino_head.last_layer.weight_g"] == (1.0, 1.0, True)
    decayed = sorted(n for n, v in got.items() if v[1] == 1.0)
    assert len(decayed) == 4 + 1 + 12 * 4 + 3 + 2  # tokens, patch embed, 4 matrices per block, head MLP, prototypes


def test_dino_param_groups_follow_the_dino_rule(tmp_path):
    cfg = _cfg("dino_vits16", tmp_path, ["head.dino_out_dim=1024"])
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, 224)
    rule = ParamGroupRule(cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.wd_exemption)
    for name, p in arch.student.named_parameters():
        m = param_multipliers(name, p, arch.num_layers, rule)
        # DINO: one regularised group (everything else than biases and 1-D tensors), one LR for all.
        assert m["wd_multiplier"] == (0.0 if name.endswith(".bias") or p.ndim == 1 else 1.0), name
        assert m["lr_multiplier"] == 1.0, name
    assert param_multipliers("backbone.pos_embed", arch.student["backbone"].pos_embed, 12, rule)["wd_multiplier"] == 1


# ------------------------------------------------------------------------ head init
@pytest.mark.parametrize("name", ["vits14", "vitl14"])
def test_head_prototypes_start_from_nn_linear_default(name, tmp_path):
    cfg = _cfg(name, tmp_path)
    from dinov2.models.head import DINOHead

    torch.manual_seed(0)
    h = cfg.head
    head = DINOHead(64, h.dino_out_dim, 64, h.dino_bottleneck_dim, last_layer_init=h.last_layer_init,
                    last_layer_gain=h.last_layer_gain)
    w = head.last_layer.weight.detach()
    bound = 1 / math.sqrt(h.dino_bottleneck_dim)  # nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
    assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
    rows = w.norm(dim=1)
    # E||row||^2 = in * bound^2 / 3 = 1/3, whatever the bottleneck width.
    assert rows.mean().item() == pytest.approx(math.sqrt(1 / 3), rel=0.01)
    ref = torch.nn.Linear(h.dino_bottleneck_dim, h.dino_out_dim, bias=False).weight.detach().norm(dim=1)
    assert rows.mean().item() == pytest.approx(ref.mean().item(), rel=0.01)
    assert rows.std().item() == pytest.approx(ref.std().item(), rel=0.05)
    assert torch.equal(head.last_layer.weight_g.detach(), torch.ones(h.dino_out_dim, 1))
    assert head.last_layer.weight_g.requires_grad
    old = DINOHead(64, 4096, 64, h.dino_bottleneck_dim, last_layer_init="trunc_normal")
    assert old.last_layer.weight.norm(dim=1).mean().item() == pytest.approx(
        0.02 * math.sqrt(h.dino_bottleneck_dim), rel=0.02)


# ------------------------------------------------------------------------ freeze mechanics
# tiny.yaml keeps the earlier head init / gain / decay rule for its learning benchmarks: use the reference ones.
REFERENCE_HEAD = ["head.last_layer_init=linear_default", "head.last_layer_gain=learned", "optim.wd_exemption=dinov2"]


def _tiny_arch(tmp_path, mode: str, extra=()):
    cfg = load_train_config(CONFIG, tiny_overrides(tmp_path, 4, [f"optim.freeze_last_layer_mode={mode}",
                                                                 *REFERENCE_HEAD, *extra]))
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, GSIZE)
    return cfg, arch, build_optimizer(arch, cfg)


def _steps(cfg, arch, opt, n: int, frozen_until: int):
    """The training step's order: schedule, backward, clip, freeze, AdamW; returns the last layer's grads."""
    sched = make_schedules(cfg, 1)
    last = arch.last_layer_params()
    grads = []
    batches = iter(photo_batch_source()(0, 1, 0))
    for step in range(n):
        v = sched.values(step)
        apply_schedule(opt, v["lr"] or 1e-3, v["wd"], 0.0 if step < frozen_until else (v["lr"] or 1e-3))
        opt.zero_grad(set_to_none=True)
        arch.forward_loss(next(batches), v["teacher_temp"]).loss.backward()
        arch.clip_gradients(cfg.optim.clip_grad, cfg.optim.clip_grad_rule)
        apply_last_layer_freeze(last, cfg.optim.freeze_last_layer_mode, frozen=step < frozen_until)
        grads.append([None if p.grad is None else p.grad.clone() for p in last])
        opt.step()
    return grads


def test_lr_zero_freeze_keeps_real_moments_and_never_moves_the_layer(tmp_path):
    cfg, arch, opt = _tiny_arch(tmp_path, "lr_zero")
    last = arch.last_layer_params()
    before = [p.detach().clone() for p in last]
    grads = _steps(cfg, arch, opt, 3, frozen_until=3)
    b1, b2 = cfg.optim.adamw_beta1, cfg.optim.adamw_beta2
    for i, p in enumerate(last):
        assert torch.equal(p.detach(), before[i])  # LR 0: no step and no decoupled decay
        m = torch.zeros_like(p)
        v = torch.zeros_like(p)
        for g in grads:  # AdamW's moments over the real (clipped) gradients, as in the DINOv2 reference
            assert g[i] is not None and g[i].abs().sum() > 0
            m = b1 * m + (1 - b1) * g[i]
            v = b2 * v + (1 - b2) * g[i] * g[i]
        st = opt.state[p]
        torch.testing.assert_close(st["exp_avg"], m, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(st["exp_avg_sq"], v, rtol=1e-5, atol=1e-12)
        assert float(st["step"]) == 3


def test_drop_grad_freeze_leaves_adamw_state_untouched_then_steps_like_a_fresh_adamw(tmp_path):
    cfg, arch, opt = _tiny_arch(tmp_path, "drop_grad", ["optim.clip_grad_rule=per_parameter"])
    last = arch.last_layer_params()
    before = [p.detach().clone() for p in last]
    grads = _steps(cfg, arch, opt, 2, frozen_until=2)
    for i, p in enumerate(last):
        assert all(g[i] is None for g in grads)
        assert torch.equal(p.detach(), before[i])
        st = opt.state[p]  # created up front (checkpointable), still exactly a fresh state
        assert float(st["step"]) == 0
        assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()
    # The first unfrozen step equals a brand-new AdamW's first step on the same gradient (the reference
    # creates the state lazily at that moment).
    clones = [torch.nn.Parameter(p.detach().clone()) for p in last]
    grads = _steps_from(cfg, arch, opt, step=2)
    group = next(g for g in opt.param_groups if g.get("is_last_layer"))
    fresh = torch.optim.AdamW(clones, lr=group["lr"], weight_decay=group["weight_decay"],
                              betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    for c, g in zip(clones, grads):
        c.grad = g
    fresh.step()
    for p, c, b in zip(last, clones, before):
        torch.testing.assert_close(p.detach(), c.detach(), rtol=1e-6, atol=1e-9)
        assert not torch.equal(p.detach(), b)


def _steps_from(cfg, arch, opt, step: int):
    """One unfrozen step at ``step``; returns the last layer's gradients it used."""
    sched = make_schedules(cfg, 1)
    v = sched.values(step)
    apply_schedule(opt, v["lr"], v["wd"], v["lr"])
    opt.zero_grad(set_to_none=True)
    batch = next(iter(photo_batch_source(seed=1)(0, 1, 0)))
    arch.forward_loss(batch, v["teacher_temp"]).loss.backward()
    arch.clip_gradients(cfg.optim.clip_grad, cfg.optim.clip_grad_rule)
    last = arch.last_layer_params()
    apply_last_layer_freeze(last, cfg.optim.freeze_last_layer_mode, frozen=False)
    grads = [p.grad.clone() for p in last]
    opt.step()
    return grads


def test_drop_grad_freeze_resumes_exactly_from_a_checkpoint_taken_while_frozen(tmp_path):
    from dinov2.train.checkpoint import read_checkpoint_tensors
    from dinov2.train.train import run_training

    extra = ["optim.freeze_last_layer_mode=drop_grad", "optim.freeze_last_layer_epochs=0.75",
             "checkpoint.every_n_steps=1", *REFERENCE_HEAD]
    straight = load_train_config(CONFIG, tiny_overrides(tmp_path / "a", 5, extra))
    run_training(straight, batch_source=photo_batch_source())
    first = load_train_config(CONFIG, tiny_overrides(tmp_path / "b", 1, extra))
    run_training(first, batch_source=photo_batch_source())  # stops at step 1, inside the 3-step freeze
    rest = load_train_config(CONFIG, tiny_overrides(tmp_path / "b", 5, extra))
    res = run_training(rest, batch_source=photo_batch_source())
    assert res.start_step == 1 and res.final_step == 5
    a = read_checkpoint_tensors(tmp_path / "a" / "ckpt" / "step_000005", "student.")
    b = read_checkpoint_tensors(tmp_path / "b" / "ckpt" / "step_000005", "student.")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


# ------------------------------------------------------------------------ clipping
def _grads_of_mixed_size(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape, scale in (((7, 5), 10.0), ((3,), 0.01), ((4, 4, 2), 1.0), ((11,), 3.0)):
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=g) * scale
        params.append(p)
    return params


def test_per_parameter_clip_is_dinos_formula():
    params = _grads_of_mixed_size(0)
    expected = []
    for p in params:
        n = p.grad.norm(2)
        coef = 3.0 / (n + 1e-6)
        expected.append(p.grad * coef if coef < 1 else p.grad.clone())
    norms = clip_per_parameter_(params, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=0)
    assert norms[1] < 3.0 and norms[0] > 3.0  # some clipped, some kept
    assert all(p.grad.norm() <= 3.0 + 1e-5 for p in params)


def test_per_module_clip_is_torch_clip_grad_norm_per_student_module(tmp_path):
    _, arch, _ = _tiny_arch(tmp_path, "lr_zero")
    batch = next(iter(photo_batch_source()(0, 1, 0)))
    arch.forward_loss(batch, 0.04).loss.backward()
    ref = {}
    for name, module in arch.student.items():
        grads = [p.grad.clone() for p in module.parameters()]
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        coef = min(1.0, 0.01 / (float(total) + 1e-6))
        ref[name] = [g * coef for g in grads]
    norms = arch.clip_gradients(0.01, "per_module")
    for name, module in arch.student.items():
        assert norms[f"grad_norm_{name}"] > 0.01
        for p, r in zip(module.parameters(), ref[name]):
            torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-12)


@pytest.mark.slow
def test_dino_mechanics_under_fsdp2_match_one_process(tmp_path):
    """Per-parameter clipping on FSDP2 shards uses each whole tensor's norm (one all-reduce), and the
    dropped-gradient freeze works on sharded parameters: 2 processes follow the 1-process run."""
    extra = NO_KOLEO + REFERENCE_HEAD + ["optim.clip_grad=0.05", "optim.clip_grad_rule=per_parameter",
                                         "optim.freeze_last_layer_mode=drop_grad", "optim.wd_exemption=dino"]
    one, two = tmp_path / "ws1", tmp_path / "ws2"
    run(one, 4, extra)
    _torchrun(two, 4, extra)
    l1, l2 = _losses(one), _losses(two)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        for k in l1[step]:
            assert l2[step][k] == pytest.approx(l1[step][k], rel=1e-4), (step, k, l1[step][k], l2[step][k])
    rows = [r for r in map(json.loads, (one / "metrics.jsonl").read_text().splitlines()) if "grad_norm_backbone" in r]
    assert all(r["grad_norm_backbone"] > 0.05 for r in rows)  # the clip is active, not a no-op


# ------------------------------------------------------------------------ schedules
def _reference_cosine(base, final, total, warmup=0, start=0.0, freeze=0):
    """Both references' cosine table: zeros, np.linspace warmup, half cosine over the rest."""
    iters = np.arange(total - warmup - freeze)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((np.zeros(freeze), np.linspace(start, base, warmup), cos))


def test_schedules_equal_the_reference_tables(tmp_path):
    cfg = _cfg("vits14", tmp_path, ["optim.epochs=6", "optim.epoch_length=10", "optim.warmup_epochs=2",
                                    "loss.warmup_teacher_temp_epochs=3"])
    s = make_schedules(cfg, 16)  # 16 ranks x 64 = 1024 images: the sqrt rule leaves base_lr as is
    lr = _reference_cosine(0.004, 1e-6, 60, warmup=20)
    last = lr.copy()
    last[:10] = 0.0  # freeze_last_layer_epochs = 1
    temp = np.concatenate((np.linspace(0.04, 0.07, 30), np.full(30, 0.07)))
    for it in range(60):
        assert s.lr(it) == pytest.approx(lr[it], rel=1e-12, abs=1e-15), it
        assert s.last_layer_lr(it) == pytest.approx(last[it], rel=1e-12, abs=1e-15), it
        assert s.wd(it) == pytest.approx(_reference_cosine(0.04, 0.4, 60)[it], rel=1e-12), it
        assert s.momentum(it) == pytest.approx(_reference_cosine(0.992, 1.0, 60)[it], rel=1e-12), it
        assert s.teacher_temp(it) == pytest.approx(temp[it], rel=1e-12), it


def test_dino_teacher_temperature_steps_once_per_epoch(tmp_path):
    cfg = _cfg("dino_vits16", tmp_path, ["optim.epoch_length=10"])
    s = make_schedules(cfg, 16)
    table = np.concatenate((np.linspace(0.04, 0.07, 30), np.full(70, 0.07)))  # indexed by epoch
    for it in (0, 9, 10, 155, 289, 290, 299, 300, 999):
        assert s.teacher_temp(it) == pytest.approx(table[it // 10], rel=1e-12), it
    assert s.lr(0) == 0.0 and s.lr(100) == pytest.approx(5e-4 * 1024 / 256)  # linear rule, 16 x 64 images
