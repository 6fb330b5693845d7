"""Training phases: the main SSL phase, then an optional short high-resolution finishing phase.

Config section (``phases.highres.steps: 0`` → no high-resolution phase)::

    phases:
      highres:
        steps: 2000              # M extra steps after the main phase's N (= cfg.total_steps)
        global_crops_size: 518   # 0 → 1.5 × the main phase's size, rounded to the patch (84 → 126)
        local_crops_size: 0      # 0 → same as the main phase
        base_lr: 0.0             # peak LR before scaling (0 → the main schedule's LR at step N)
        min_lr: 1.0e-6
        warmup_steps: 0
        batch_size: 0            # per rank; 0 → same as the main phase

One ``dinov2 train`` runs both phases back to back in the same run folder: step numbers continue
(N+1 … N+M), every ``metrics.jsonl`` row carries ``phase`` ("main" | "highres"), checkpoints stay
in ``RUN/ckpt/step_*`` and the high-resolution phase's config is written to
``RUN/config.highres.yaml``.  The phase to run is decided from the latest complete checkpoint:
a run killed in either phase resumes in that phase.

Design choices (why):

* Position embeddings keep the main phase's grid (``model.img_size`` is pinned to it), and the
  backbone interpolates that grid to the larger crops at forward time, exactly as it does for any
  input size — so the phase-2 model loads the phase-1 checkpoint (same parameter shapes, same AdamW
  state) and the final checkpoint accepts any multiple of the patch size (e.g. 518 px).
* Schedules restart for the short phase: LR warms up from 0 over ``warmup_steps`` to its peak then
  follows a half cosine to ``min_lr`` over the M steps; the EMA momentum follows a half cosine from
  its value at step N to ``optim.final_momentum_teacher``; weight decay and teacher temperature stay
  at their step-N values; the head's last layer is not frozen again.
* Data: the stream continues at the first batch boundary at or after the main phase's position
  (``ceil(N·B1 / B2)·B2`` samples per rank, B = per-rank batch size), with the new crop sizes, so
  phase 2 sees the next images of the same deterministic stream; a resumed phase 2 restarts at
  that position plus the steps it already took.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dinov2.train.schedules import CosineSchedule, Schedules, scaled_lr

if TYPE_CHECKING:
    from dinov2.train.config import TrainConfig
    from dinov2.train.distributed import DistInfo
    from dinov2.train.train import TrainResult

MAIN = "main"
HIGHRES = "highres"


@dataclass
class HighResPhaseConfig:
    steps: int = 0  # 0 → no high-resolution phase
    global_crops_size: int = 0  # 0 → 1.5 × the main phase's size, rounded to a patch multiple
    local_crops_size: int = 0  # 0 → main phase's size
    base_lr: float = 0.0  # 0 → the main schedule's LR at the end of the main phase (before scaling)
    min_lr: float = 1.0e-6
    warmup_steps: int = 0
    batch_size: int = 0  # per rank; 0 → main phase's batch size


@dataclass
class PhasesConfig:
    highres: HighResPhaseConfig = field(default_factory=HighResPhaseConfig)


def phases_config_errors(cfg: TrainConfig) -> list[str]:
    """Cross-field problems of ``cfg.phases`` (used by ``TrainConfig.validate``)."""
    h = cfg.phases.highres
    err: list[str] = []
    if h.steps < 0:
        err.append(f"phases.highres.steps must be >= 0, got {h.steps}")
    if h.steps <= 0:
        return err
    for name in ("global_crops_size", "local_crops_size", "batch_size", "warmup_steps"):
        if getattr(h, name) < 0:
            err.append(f"phases.highres.{name} must be >= 0")
    if h.global_crops_size and h.global_crops_size % cfg.model.patch_size:
        err.append(f"phases.highres.global_crops_size {h.global_crops_size} is not a multiple of "
                   f"model.patch_size {cfg.model.patch_size}")
    if h.warmup_steps > h.steps:
        err.append(f"phases.highres.warmup_steps {h.warmup_steps} exceeds phases.highres.steps {h.steps}")
    if h.base_lr < 0 or h.min_lr < 0:
        err.append("phases.highres.base_lr and min_lr must be >= 0")
    if not cfg.checkpoint.save_final:
        err.append("phases.highres.steps > 0 needs checkpoint.save_final=true (phase 2 starts from the "
                   "main phase's final checkpoint)")
    return err


@dataclass(frozen=True)
class HighResSchedules:
    """Schedules of the high-resolution phase, indexed by the *global* step."""

    start_step: int
    lr: CosineSchedule
    wd: float
    momentum: CosineSchedule
    teacher_temp: float

    def values(self, step: int) -> dict[str, float]:
        i = step - self.start_step
        lr = self.lr(i)
        return {"lr": lr, "last_layer_lr": lr, "wd": self.wd, "momentum": self.momentum(i),
                "teacher_temp": self.teacher_temp}


@dataclass(frozen=True)
class PhasePlan:
    """What ``run_training`` needs to run one phase of a multi-phase run."""

    name: str
    start_step: int  # global step at which this phase starts
    end_step: int  # global step at which it ends (the loop's total)
    batch_size: int  # per rank
    data_start: int = 0  # per-rank sample position of the data stream at start_step
    schedules: Any = None  # object with .values(step); None → the config's own schedules
    freeze_last_layer: bool = True  # False → never freeze the head's last layer in this phase
    config_name: str = "config.yaml"

    def data_sample(self, step: int) -> int:
        """Per-rank stream position before global step ``step`` (the loader's start_sample)."""
        return self.data_start + (step - self.start_step) * self.batch_size


def highres_global_size(cfg: TrainConfig) -> int:
    """The phase's global crop size: as configured, else 1.5 × the main size (84 → 126, 224 → 336)."""
    h, p = cfg.phases.highres, cfg.model.patch_size
    if h.global_crops_size:
        return h.global_crops_size
    return int(cfg.data.crops.global_crops_size * 1.5 / p + 0.5) * p


def highres_config(cfg: TrainConfig) -> TrainConfig:
    """The config the high-resolution phase trains with (derived from the main config)."""
    h = cfg.phases.highres
    out = copy.deepcopy(cfg)
    main_grid_px = cfg.model.img_size or int(cfg.data.crops.global_crops_size)
    out.model.img_size = main_grid_px  # same pos_embed shape; interpolated at forward time
    out.model.pretrained = ""  # weights come from the main phase's checkpoint
    out.data.crops.global_crops_size = highres_global_size(cfg)
    if h.local_crops_size:
        out.data.crops.local_crops_size = h.local_crops_size
    if h.batch_size:
        out.data.batch_size = h.batch_size
    out.checkpoint.save_final = True
    out.validate()
    return out


def highres_schedules(cfg: TrainConfig, main_schedules: Schedules, world_size: int) -> HighResSchedules:
    h = cfg.phases.highres
    n = cfg.total_steps
    end = main_schedules.values(n - 1) if n > 0 else main_schedules.values(0)
    batch = h.batch_size or cfg.data.batch_size
    if h.base_lr > 0:
        peak = scaled_lr(h.base_lr, batch * world_size, cfg.optim.lr_scaling)
    else:
        peak = end["lr"]
    return HighResSchedules(
        start_step=n,
        lr=CosineSchedule(peak, min(h.min_lr, peak), h.steps, warmup_iters=h.warmup_steps),
        wd=end["wd"],
        momentum=CosineSchedule(end["momentum"], cfg.optim.final_momentum_teacher, h.steps),
        teacher_temp=end["teacher_temp"],
    )


def plans(cfg: TrainConfig, world_size: int) -> list[tuple[PhasePlan, TrainConfig]]:
    """(plan, config) of every phase, in order."""
    from dinov2.train.train import make_schedules

    n = cfg.total_steps
    main_cfg = copy.deepcopy(cfg)
    main_cfg.checkpoint.save_final = True
    out = [(PhasePlan(MAIN, 0, n, cfg.data.batch_size), main_cfg)]
    h = cfg.phases.highres
    if h.steps > 0:
        hcfg = highres_config(cfg)
        b1, b2 = cfg.data.batch_size, hcfg.data.batch_size
        data_start = math.ceil(n * b1 / b2) * b2
        out.append((PhasePlan(HIGHRES, n, n + h.steps, b2, data_start,
                              highres_schedules(cfg, make_schedules(cfg, world_size), world_size),
                              freeze_last_layer=False, config_name=f"config.{HIGHRES}.yaml"), hcfg))
    return out


BatchSourceFn = Callable[[int, int, int], Iterable[dict[str, Any]]]


def run_phases(cfg: TrainConfig, batch_source: BatchSourceFn | Mapping[str, BatchSourceFn] | None = None,
               info: DistInfo | None = None) -> TrainResult:
    """Run every configured phase back to back, skipping phases a previous run completed.

    ``batch_source``: one source for all phases, or ``{phase name: source}`` (a custom source must
    yield the crop sizes of its phase); None → the real loader built from each phase's config.
    """
    from dinov2.train import checkpoint as ckpt_lib
    from dinov2.train.distributed import broadcast_object, init_distributed
    from dinov2.train.train import run_training

    info = info or init_distributed(cfg.compute.device)
    latest = broadcast_object(str(ckpt_lib.latest_checkpoint(cfg.train.output_dir) or "") if info.is_main else None)
    done_step = int(ckpt_lib.read_meta(latest)["step"]) if latest else 0

    result = None
    first_start = None
    rows: list[dict[str, Any]] = []
    for plan, pcfg in plans(cfg, info.world_size):
        if done_step >= plan.end_step:
            continue  # finished by an earlier run
        if plan.start_step > 0 and done_step < plan.start_step:
            raise RuntimeError(f"phase {plan.name!r} starts at step {plan.start_step} but the latest checkpoint is "
                               f"at step {done_step}: the previous phase did not finish")
        source = batch_source.get(plan.name) if isinstance(batch_source, Mapping) else batch_source
        result = run_training(pcfg, source, info, phase=plan)
        if first_start is None:
            first_start = result.start_step
        rows.extend(result.metrics)
        done_step = result.final_step
    if result is None:  # everything was already done: report the final state without training
        from pathlib import Path

        from dinov2.train.train import TrainResult

        return TrainResult(Path(cfg.train.output_dir), done_step, done_step, Path(latest) if latest else None)
    result.start_step = first_start if first_start is not None else result.start_step
    result.metrics = rows
    return result
