"""Preparing a run folder: one writer at a time, and no resume on a changed architecture.

Order matters: nothing in the folder is changed (stale temp folders removed, ``config.yaml``
rewritten) until the lock is held and the new config is known to fit the checkpoints there.
"""
from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from dinov2.eval.features import list_labeled
from dinov2.train import checkpoint as ckpt_lib
from dinov2.train.distributed import DistInfo, barrier, broadcast_object
from dinov2.utils.config import ConfigError, flatten, to_dict, to_yaml
from dinov2.utils.io import atomic_write_text
from dinov2.utils.lock import FolderLock

log = logging.getLogger(__name__)

# Config keys that decide what the checkpoint's tensors mean.  A resume that changes one of them
# would load weights into a different network (same shapes, other meaning: e.g. num_heads) or crash
# half-way.  model.pretrained only matters at step 0; drop path changes training, not the weights.
_ARCH_SECTIONS = ("model.", "head.")
_ARCH_EXTRA = ("loss.centering", "distill.teacher_checkpoint", "distill.teacher_heads")
_NOT_ARCH = ("model.pretrained", "model.drop_path_rate", "model.drop_path_uniform")


class ResumeConfigMismatch(ConfigError):
    """The run folder holds checkpoints of a different architecture."""


def _effective(flat: dict[str, Any]) -> dict[str, Any]:
    """Resolve defaults that hide a shape: img_size 0 means the global crop size.  Enum members
    compare by value (the saved YAML holds their strings)."""
    out = {k: (v.value if isinstance(v, Enum) else v) for k, v in flat.items()}
    if not out.get("model.img_size"):
        out["model.img_size"] = out.get("data.crops.global_crops_size")
    return out


def _is_arch_key(key: str) -> bool:
    return (key.startswith(_ARCH_SECTIONS) or key in _ARCH_EXTRA) and key not in _NOT_ARCH


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(architecture changes, other changes) between two config dicts, as "key: old → new"."""
    a, b = _effective(flatten(old)), _effective(flatten(new))
    arch, other = [], []
    for key in sorted(set(a) & set(b)):  # keys one version lacks cannot be compared
        if a[key] != b[key]:
            (arch if _is_arch_key(key) else other).append(f"{key}: {a[key]!r} → {b[key]!r}")
    return arch, other


def check_resume_config(run_dir: Path, config_name: str, cfg: Any) -> None:
    """Refuse to resume checkpoints of ``run_dir`` under a config with another architecture."""
    saved = run_dir / config_name
    if not saved.is_file() or not ckpt_lib.list_checkpoints(run_dir):
        return  # nothing to resume: a fresh start may use any config
    try:
        old = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{saved}: unreadable ({exc}); cannot tell whether the checkpoints match") from None
    if not isinstance(old, dict):
        raise ConfigError(f"{saved}: not a config mapping; cannot tell whether the checkpoints match")
    arch, other = config_changes(old, to_dict(cfg))
    if arch:
        shown = "; ".join(arch[:8]) + (" …" if len(arch) > 8 else "")
        raise ResumeConfigMismatch(
            f"{run_dir} holds checkpoints of another architecture ({shown}): resuming would reinterpret "
            f"their weights. Use a new train.output_dir, or restore those values to resume.")
    if other:
        log.info("resuming %s with changed settings: %s", run_dir, "; ".join(other))


def _check_eval_sets(cfg: Any) -> None:
    """An evaluation during training must not fail hours in: list its image sets up front."""
    ev = getattr(cfg, "eval", None)
    if ev is None or not (ev.every_n_steps > 0 or ev.at_end) or not (ev.train_dir and ev.val_dir):
        return
    for key in ("train_dir", "val_dir"):
        try:
            list_labeled(getattr(ev, key))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"eval.{key}: {exc}") from None


def prepare_run_dir(cfg: Any, info: DistInfo, config_name: str = "config.yaml") -> FolderLock | None:
    """Collective.  Lock the run folder (rank 0), check the config against its checkpoints, then
    clear stale temp folders and save the config.  Returns the held lock (rank 0) or None."""
    run_dir = Path(cfg.train.output_dir)
    lock: FolderLock | None = None
    error = ""
    if info.is_main:
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"train.output_dir {run_dir} exists and is not a folder")
            _check_eval_sets(cfg)
            lock = FolderLock(run_dir, "dinov2 train").acquire()
            check_resume_config(run_dir, config_name, cfg)
            ckpt_lib.remove_stale_tmp(run_dir)
            atomic_write_text(run_dir / config_name, to_yaml(cfg))
        except Exception as exc:  # every rank must learn that rank 0 stopped
            if lock is not None:
                lock.release()
            error = f"{type(exc).__name__}\0{exc}"
            if not info.distributed:
                raise
    error = broadcast_object(error) if info.distributed else error
    if error:
        kind, _, text = error.partition("\0")
        raise (ConfigError if kind.endswith(("ConfigError", "Mismatch")) else RuntimeError)(text)
    barrier()
    return lock
