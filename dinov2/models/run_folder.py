"""The teacher backbone of a run / checkpoint folder, with the constructor values its tensors do not
show: the head count, position-resize mode and LayerNorm eps come from the run's ``config.yaml``.

Inferring the heads from the width (as for a bare ``.pth``) would silently compute different
features for a run trained with a non-default ``model.num_heads``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2.models.config import ModelConfig, build_backbone
from dinov2.models.formats.files import WeightsFileError
from dinov2.utils.checkpoint_folder import CheckpointError, load_teacher_backbone_state, resolve_checkpoint

log = logging.getLogger("dinov2.export")
# The main config first: the high-resolution phase's config has the same backbone.
CONFIG_NAMES = ("config.yaml", "config.highres.yaml")


class RunConfigError(WeightsFileError):
    """A run folder has no complete checkpoint, or its config.yaml does not describe a backbone."""


def find_run_config(ckpt: Path) -> Path | None:
    """``RUN/config.yaml`` for ``RUN`` or ``RUN/ckpt/step_X`` (checkpoints live two levels down)."""
    for folder in (ckpt, ckpt.parent, ckpt.parent.parent):
        for name in CONFIG_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def backbone_hints(config_path: Path) -> dict[str, Any]:
    """Constructor values of the run's backbone that the tensors cannot show."""
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RunConfigError(f"{config_path}: not readable YAML ({exc})") from exc
    section = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise RunConfigError(f"{config_path}: has no 'model' section")
    try:
        model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))
    except OmegaConfBaseException as exc:
        raise RunConfigError(f"{config_path}: invalid model section ({str(exc).splitlines()[0]})") from exc
    # Build the configured backbone shape-only (meta device) so these are exactly the training values.
    with torch.device("meta"):
        backbone = build_backbone(model_cfg, img_size=model_cfg.patch_size, drop_path_rate=0.0)
    return {
        "num_heads": int(backbone.num_heads),
        "interpolate_offset": float(backbone.interpolate_offset),
        "interpolate_antialias": bool(backbone.interpolate_antialias),
        "norm_eps": float(backbone.norm.eps),
    }


def run_hints(ckpt: Path) -> dict[str, Any]:
    """:func:`backbone_hints` of the run holding checkpoint folder ``ckpt`` ({} without a config)."""
    config = find_run_config(ckpt)
    if config is None:
        log.warning("%s: no config.yaml beside the checkpoint; head count inferred from the width", ckpt)
        return {}
    return backbone_hints(config)


def read_run_backbone(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(official-layout teacher backbone tensors, constructor hints) of a run or checkpoint folder."""
    try:
        ckpt = resolve_checkpoint(path)
        state = load_teacher_backbone_state(ckpt)
    except CheckpointError as exc:
        raise RunConfigError(str(exc)) from exc
    return state, run_hints(ckpt)
