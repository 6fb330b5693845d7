"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout (one folder per checkpoint, all ranks write their shards into it)::

    RUN/ckpt/step_000123/          complete checkpoint (renamed from step_000123.tmp/ at the end)
        .metadata, __0_0.distcp …  DCP: student (backbone + heads), teacher, optimizer, centers
        rng_rank0.pt …             torch / numpy / python RNG states of each rank
        meta.json                  step, data position, world size, schedule values (written last)
        verified.json              written once a later step computed a finite loss from these weights

Writing goes to ``step_X.tmp/``; rank 0 renames it after every rank has finished, so a folder
without the ``.tmp`` suffix is always complete and "latest complete checkpoint" is just the highest
such step.  DCP reshards on load, so a run may resume on a different world size.

Reading treats the folder as untrusted (``dinov2.train.safe_load``: allow-listed metadata
unpickler, ``weights_only`` everywhere) and checks it before use (:func:`verify_checkpoint`): a
checkpoint whose files were truncated or lost after it was written is skipped, with a warning,
for the newest intact one.

A checkpoint's state is checked finite before it is written, but weights can be finite and still
exploded (the next forward overflows).  So a checkpoint only counts as *verified* (good) once the
step after it was finite; rotation never removes the newest verified checkpoint, and a run stopped
by a non-finite step moves the unverified checkpoints after it aside (``step_X.unverified/``) so
that resuming starts from a good one.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from dinov2.train.distributed import barrier
from dinov2.train.safe_load import (
    DamagedCheckpointError,
    SafeFileSystemReader,
    SafeLoadPlanner,
    UnsafeCheckpointError,
    encode_rng_state,
    load_rng_file,
    read_dcp_metadata,
)
from dinov2.utils.io import atomic_write_json

log = logging.getLogger(__name__)
_STEP_RE = re.compile(r"^step_(\d+)$")
META = "meta.json"
VERIFIED = "verified.json"
UNVERIFIED_SUFFIX = ".unverified"


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


def remove_stale_tmp(run_dir: str | Path) -> None:
    """Delete half-written ``*.tmp`` folders left by a killed run (rank 0, before training)."""
    root = ckpt_root(run_dir)
    if root.is_dir():
        for p in root.iterdir():
            if p.name.endswith(".tmp") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG states in a ``weights_only``-loadable form."""
    return encode_rng_state(torch.get_rng_state(),
                            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                            np.random.get_state(), random.getstate())


def _apply_rng_states(states: tuple) -> None:
    torch_state, cuda_states, numpy_state, python_state = states
    torch.set_rng_state(torch_state)
    if cuda_states is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def _app_state(arch, optimizer) -> dict[str, Any]:
    opts = StateDictOptions(full_state_dict=False)
    return {
        "student": get_model_state_dict(arch.student, options=opts),
        "teacher": get_model_state_dict(arch.teacher, options=opts),
        "optimizer": get_optimizer_state_dict(arch.student, optimizer, options=opts),
        "centers": arch.center_state_dict(),
    }


def save_checkpoint(run_dir: str | Path, step: int, arch, optimizer, meta: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank must call it.  Returns the final folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    with _quiet_single_process():
        dcp.save(_app_state(arch, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_json(tmp / META, {**meta, "step": step, "world_size": world})
        if final.exists():  # re-saving the same step (e.g. final step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        rotate(run_dir, keep_last)
    barrier()
    return final


def _step_of(ckpt: Path) -> int:
    return int(_STEP_RE.match(ckpt.name).group(1))


def is_verified(ckpt: str | Path) -> bool:
    return (Path(ckpt) / VERIFIED).is_file()


def mark_verified(ckpt: str | Path, by_step: int) -> None:
    """Rank 0: a step after ``ckpt`` (``by_step``) computed a finite loss and gradients from it."""
    atomic_write_json(Path(ckpt) / VERIFIED, {"finite_step": by_step})


def newest_verified(run_dir: str | Path) -> Path | None:
    good = [p for p in list_checkpoints(run_dir) if is_verified(p)]
    return good[-1] if good else None


def rotate(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` checkpoints (0: all) and, whatever their age, the newest verified one."""
    if keep_last <= 0:
        return
    keep = newest_verified(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def set_aside_unverified(run_dir: str | Path, after: Path | None) -> list[Path]:
    """Rank 0, after a non-finite step: rename the checkpoints newer than ``after`` (the newest
    verified one, or None) to ``step_X.unverified`` so the next run resumes from ``after``."""
    moved = []
    floor = _step_of(after) if after is not None else -1
    for p in list_checkpoints(run_dir):
        if _step_of(p) > floor and not is_verified(p):
            target = p.with_name(p.name + UNVERIFIED_SUFFIX)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(p, target)
            moved.append(target)
    if moved:
        _fsync_dir(ckpt_root(run_dir))
    return moved


def load_checkpoint(ckpt: str | Path, arch, optimizer, load_optimizer: bool = True) -> dict[str, Any]:
    """Collective: load model/teacher/optimizer/centers (resharding as needed) and this rank's
    RNG state when the checkpoint has one for it.  Returns meta.json."""
    ckpt = Path(ckpt)
    if not (ckpt / META).is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {META})")
    verify_checkpoint(ckpt)
    state = _app_state(arch, optimizer if load_optimizer else None) if load_optimizer else {
        "student": get_model_state_dict(arch.student),
        "teacher": get_model_state_dict(arch.teacher),
        "centers": arch.center_state_dict(),
    }
    _safe_dcp_load(state, ckpt, no_dist=not dist.is_initialized())
    set_model_state_dict(arch.student, state["student"])
    set_model_state_dict(arch.teacher, state["teacher"])
    if load_optimizer:
        set_optimizer_state_dict(arch.student, optimizer, state["optimizer"])
    arch.load_center_state_dict(state["centers"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        _apply_rng_states(load_rng_file(rng_file))
    return read_meta(ckpt)


def _safe_dcp_load(state: dict[str, Any], ckpt: Path, no_dist: bool) -> None:
    """``dcp.load`` through the safe reader and planner; damage becomes a CheckpointError."""
    try:
        with _quiet_single_process():
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
    _safe_dcp_load(state, ckpt, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def load_teacher_backbone_state(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Full teacher backbone weights of a run/checkpoint folder (used by ``dinov2 export``)."""
    return read_checkpoint_tensors(ckpt, "teacher.backbone.")


def _quiet_single_process():
    """DCP warns that it runs in one process when no process group exists: that is intended here."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    return stack


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
