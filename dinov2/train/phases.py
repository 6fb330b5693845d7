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
* Data: the stream continues at the first batch boundary at or after the main phase's final
  position (``ceil(P / B2)·B2`` samples per rank, P = the position saved in the main phase's final
  checkpoint, B2 = the new per-rank batch size), with the new crop sizes, so phase 2 sees the next
  images of the same deterministic stream; a resumed phase 2 continues at its saved position.

This module only plans the phases; :func:`dinov2.train.train.run_training` drives them, one
:class:`dinov2.train.trainer.Trainer` per phase.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

from dinov2.train.config import TrainConfig
from dinov2.train.schedules import CosineSchedule, Schedules, ScheduleSource, scaled_lr, schedules_for

MAIN = "main"
HIGHRES = "highres"


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
    """One phase of a run: its global steps, schedules and what the trainer does differently."""

    name: str
    start_step: int  # global step at which this phase starts
    end_step: int  # global step at which it ends (the loop's total)
    batch_size: int  # per rank
    schedules: ScheduleSource
    freeze_last_layer: bool = True  # False → never freeze the head's last layer in this phase
    config_name: str = "config.yaml"

    def first_sample(self, previous_position: int) -> int:
        """Where this phase's stream starts, given the position the previous phase ended at: the
        next boundary of this phase's batch size (the loader starts on batch boundaries)."""
        return math.ceil(previous_position / self.batch_size) * self.batch_size


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
    n = cfg.total_steps
    main_cfg = copy.deepcopy(cfg)
    main_cfg.checkpoint.save_final = True
    main_schedules = schedules_for(cfg, world_size)
    out = [(PhasePlan(MAIN, 0, n, cfg.data.batch_size, main_schedules), main_cfg)]
    h = cfg.phases.highres
    if h.steps > 0:
        hcfg = highres_config(cfg)
        out.append((PhasePlan(HIGHRES, n, n + h.steps, hcfg.data.batch_size,
                              highres_schedules(cfg, main_schedules, world_size),
                              freeze_last_layer=False, config_name=f"config.{HIGHRES}.yaml"), hcfg))
    return out
