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

Reading treats the folder as untrusted (``dinov2.utils.safe_dcp``: allow-listed metadata
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

import logging
import os
import random
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
from dinov2.utils.checkpoint_folder import (  # noqa: F401  (the read side, re-exported)
    _STEP_RE,
    META,
    CheckpointError,
    ckpt_root,
    latest_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    load_teacher_backbone_state,
    quiet_single_process,
    read_checkpoint_tensors,
    read_meta,
    resolve_checkpoint,
    safe_dcp_load,
    step_dir,
    verify_checkpoint,
)
from dinov2.utils.io import atomic_write_json
from dinov2.utils.safe_dcp import encode_rng_state, load_rng_file

log = logging.getLogger(__name__)
VERIFIED = "verified.json"
UNVERIFIED_SUFFIX = ".unverified"


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
    with quiet_single_process():
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
    safe_dcp_load(state, ckpt, no_dist=not dist.is_initialized())
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
