"""Reading a training run folder's checkpoints without the trainer (export, eval, distillation,
curation embedders, resume).

Layout: ``RUN/ckpt/step_NNNNNN/`` holds DCP shards (``.metadata``, ``*.distcp``), ``rng_rank*.pt``
and ``meta.json`` (written last); the writer is :mod:`dinov2.train.checkpoint`.  Everything here
treats the folder as untrusted (:mod:`dinov2.utils.safe_dcp`) and checks a checkpoint before use
(:func:`verify_checkpoint`), so a damaged newest checkpoint is skipped for the newest intact one.
It sits below both the models and the trainer: ``load_pretrained`` reads run folders through it.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from dinov2.utils.safe_dcp import (
    DamagedCheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    load_rng_file,
    read_dcp_metadata,
)

log = logging.getLogger("dinov2.checkpoint")
_STEP_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"


class CheckpointError(RuntimeError):
    pass


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "ckpt"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed and holding meta.json), oldest first."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def verify_checkpoint(ckpt: str | Path) -> None:
    """Raise :class:`CheckpointError` naming the file if a checkpoint folder is damaged.

    Cheap structural checks (no tensor is read): ``meta.json`` parses; ``.metadata`` loads through
    the allow-listed unpickler; every shard file it points to exists and is long enough for the
    byte ranges it lists; every RNG file loads.  An :class:`UnsafeCheckpointError` (a file asking
    for code) is raised as is: that is not damage to skip over.
    """
    ckpt = Path(ckpt)
    try:
        meta = json.loads((ckpt / META).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
            raise ValueError("no integer 'step'")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / META}: damaged ({exc})") from None
    try:
        md = read_dcp_metadata(ckpt)
    except (OSError, DamagedCheckpointError) as exc:
        raise CheckpointError(str(exc)) from None
    need: dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or "/" in rel or rel.startswith("."):
            raise CheckpointError(f"{ckpt / '.metadata'}: names a shard file outside the checkpoint: {rel!r}")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = ckpt / rel
        have = f.stat().st_size if f.is_file() else -1
        if have < size:
            what = "missing" if have < 0 else f"truncated ({have} of {size} bytes)"
            raise CheckpointError(f"{f}: {what}")
    for rng_file in sorted(ckpt.glob("rng_rank*.pt")):
        try:
            load_rng_file(rng_file)
        except DamagedCheckpointError as exc:
            raise CheckpointError(str(exc)) from None


def latest_intact_checkpoint(run_dir: str | Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint that passes :func:`verify_checkpoint` (warns for each one
    skipped).  Raises if checkpoints exist but none is intact: starting afresh would silently
    overwrite the run."""
    ckpts = list_checkpoints(run_dir)
    problems = []
    for ckpt in reversed(ckpts):
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as exc:
            problems.append(str(exc))
            if warn:
                log.warning("checkpoint %s is damaged, skipped: %s", ckpt.name, exc)
            continue
        if problems and warn:
            log.warning("using %s, the newest intact checkpoint", ckpt)
        return ckpt
    if problems:
        raise CheckpointError(f"no intact checkpoint in {ckpt_root(run_dir)} (newest problem: {problems[0]}); "
                              f"move the damaged step_* folders away to start this run afresh")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (checked), or a run folder (→ its newest intact checkpoint)."""
    path = Path(path)
    if (path / META).is_file() and (path / ".metadata").is_file():
        verify_checkpoint(path)
        return path
    latest = latest_intact_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint found at {path} (expected a run folder with "
                              f"ckpt/step_*/ or a step_* folder holding {META} and .metadata)")
    return latest


def read_meta(ckpt: str | Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(ckpt) / META).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{Path(ckpt) / META}: damaged ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(ckpt) / META}: damaged (not an object)")
    return meta


def safe_dcp_load(state: dict[str, Any], ckpt: Path, no_dist: bool) -> None:
    """``dcp.load`` through the safe reader and planner; damage becomes a CheckpointError."""
    try:
        with quiet_single_process():
            dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), planner=SafeLoadPlanner(),
                     no_dist=no_dist)
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # DCP wraps per-rank failures; keep the first line only
        if isinstance(exc, CheckpointError):
            raise
        if "UnsafeCheckpointError" in str(exc):
            raise UnsafeCheckpointError(f"{ckpt}: refused to load: {_first_line(exc)}") from None
        raise CheckpointError(f"{ckpt}: cannot be loaded ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(exc).__name__


def read_checkpoint_tensors(ckpt: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors whose DCP key starts with ``prefix`` (prefix stripped), read in one
    process without building the training model.  Keys look like ``teacher.backbone.norm.weight``,
    ``student.dino_head.mlp.0.weight``, ``optimizer.state.<param>.exp_avg``, ``centers.dino``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = resolve_checkpoint(ckpt)
    md = read_dcp_metadata(ckpt)
    state: dict[str, torch.Tensor] = {}
    for key, item in md.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(item, TensorStorageMetadata):
            state[key] = torch.empty(item.size, dtype=item.properties.dtype)
    if not state:
        raise CheckpointError(f"{ckpt} holds no tensors under {prefix!r}")
    safe_dcp_load(state, ckpt, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def load_teacher_backbone_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Full teacher backbone weights of a run/checkpoint folder (used by ``dinov2 export``)."""
    return read_checkpoint_tensors(ckpt, "teacher.backbone.")


def quiet_single_process():
    """DCP warns that it runs in one process when no process group exists: that is intended here."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return stack
