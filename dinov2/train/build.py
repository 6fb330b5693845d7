"""Building the trained objects from a config: RNG seeding, the meta-architecture (with its
teacher source) and the optimizer."""
from __future__ import annotations

import random

import numpy as np
import torch

from dinov2.train.config import TrainConfig
from dinov2.train.distill import load_frozen_teacher
from dinov2.train.param_groups import ParamGroupRule, build_param_groups, init_optimizer_state
from dinov2.train.ssl_meta_arch import SSLMetaArch


def set_threads(cfg: TrainConfig) -> None:
    if cfg.compute.num_threads > 0:
        torch.set_num_threads(cfg.compute.num_threads)
    if cfg.compute.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_arch(cfg: TrainConfig) -> SSLMetaArch:
    """Student / EMA teacher; with ``distill.teacher_checkpoint`` a frozen teacher source supplies
    the targets (it draws nothing from the global RNG, so the student starts the same either way)."""
    use_ibot = cfg.loss.ibot_weight > 0
    source = None
    if cfg.distill.teacher_checkpoint:
        source = load_frozen_teacher(cfg, use_ibot, use_ibot and cfg.head.ibot_separate_head)
    return SSLMetaArch(cfg.model, cfg.head, cfg.loss, cfg.global_crop_size, teacher_source=source)


def build_optimizer(arch: SSLMetaArch, cfg: TrainConfig) -> torch.optim.AdamW:
    rule = ParamGroupRule(cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.wd_exemption)
    groups = build_param_groups(arch.student.named_parameters(), arch.num_layers, rule)
    for g in groups:
        g.pop("names")  # keep the optimizer state dict free of non-tensor lists
    # The fused kernel (CPU and CUDA) updates every tensor in one pass: on the CPU it is ~8x faster than
    # the per-tensor loop (bench/train_step.py), its state dict is the same as the loop's, and it takes
    # the device-side ``found_inf`` flag the trainer uses to skip a non-finite step without a sync.
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=True)
    init_optimizer_state(opt)  # so a dropped-gradient freeze still checkpoints every state
    return opt
