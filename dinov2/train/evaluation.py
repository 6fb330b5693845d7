"""k-NN (and optionally linear) evaluation of the teacher backbone during training."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from dinov2.eval.run import evaluate_backbone
from dinov2.train.config import TrainConfig
from dinov2.train.distributed import DistInfo, barrier, broadcast_object
from dinov2.train.ssl_meta_arch import SSLMetaArch, build_backbone


def full_teacher_backbone_state(arch: SSLMetaArch) -> dict[str, torch.Tensor]:
    """Collective: unsharded teacher backbone weights on every rank (CPU)."""
    full = get_model_state_dict(arch.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "backbone."
    return {k[len(prefix):]: v.detach().cpu() for k, v in full.items() if k.startswith(prefix)}


def evaluate_teacher(arch: SSLMetaArch, cfg: TrainConfig, info: DistInfo, cache: dict) -> dict[str, float]:
    """Collective; computed on rank 0 and broadcast."""
    state = full_teacher_backbone_state(arch)
    results: dict[str, float] = {}
    if info.is_main:
        backbone = build_backbone(cfg.model, cfg.global_crop_size, 0.0)
        backbone.load_state_dict(state)
        backbone.to(info.device)
        results = evaluate_backbone(backbone, cfg.eval, info.device, cache=cache)
    barrier()
    return broadcast_object(results)
