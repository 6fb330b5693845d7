"""Per-iteration schedules (learning rate, weight decay, EMA momentum, teacher temperature).

Every schedule is a pure function of the iteration index, so the only "scheduler state" a
checkpoint needs is the step; resuming recomputes exactly the same values.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from dinov2.train.config import TeacherTempWarmup, TrainConfig


class ScheduleSource(Protocol):
    """Anything with per-step values (main-phase :class:`Schedules`, a later phase's own)."""

    def values(self, it: int) -> dict[str, float]: ...


@dataclass(frozen=True)
class CosineSchedule:
    """``freeze_iters`` at 0, then linear warmup from ``start_warmup_value`` to ``base_value``,
    then a half cosine from ``base_value`` to ``final_value`` ending at ``total_iters``;
    ``final_value`` afterwards."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        if self.total_iters <= 0:
            raise ValueError(f"total_iters must be > 0, got {self.total_iters}")
        if self.warmup_iters < 0 or self.freeze_iters < 0:
            raise ValueError("warmup_iters and freeze_iters must be >= 0")
        if self.freeze_iters + self.warmup_iters > self.total_iters:
            raise ValueError(
                f"freeze ({self.freeze_iters}) + warmup ({self.warmup_iters}) iterations exceed "
                f"the schedule length ({self.total_iters})"
            )

    def __call__(self, it: int) -> float:
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            # np.linspace(start, base, warmup_iters) like both references: the ramp's last iteration
            # already reaches base_value (a one-iteration warmup stays at start).
            return _ramp(self.start_warmup_value, self.base_value, it, self.warmup_iters)
        it -= self.warmup_iters
        cosine_iters = self.total_iters - self.freeze_iters - self.warmup_iters
        if cosine_iters <= 0 or it >= cosine_iters:
            return self.final_value
        cos = 0.5 * (1.0 + math.cos(math.pi * it / cosine_iters))
        return self.final_value + (self.base_value - self.final_value) * cos


@dataclass(frozen=True)
class LinearWarmupConstant:
    """``np.linspace(start, end, warmup_iters)``, then ``end`` (teacher temperature)."""

    start: float
    end: float
    warmup_iters: int

    def __call__(self, it: int) -> float:
        if self.warmup_iters <= 0 or it >= self.warmup_iters:
            return self.end
        return _ramp(self.start, self.end, it, self.warmup_iters)


def _ramp(start: float, end: float, it: int, n: int) -> float:
    """Entry ``it`` of ``np.linspace(start, end, n)``."""
    return start if n <= 1 else start + (end - start) * it / (n - 1)


@dataclass(frozen=True)
class PerEpoch:
    """``inner`` indexed by the epoch instead of the iteration (DINO's teacher-temperature table)."""

    inner: LinearWarmupConstant
    epoch_length: int

    def __call__(self, it: int) -> float:
        return self.inner(it // self.epoch_length)


def scaled_lr(base_lr: float, global_batch: int, rule: str = "sqrt_wrt_1024") -> float:
    """DINOv2 scales the base LR by sqrt(global batch / 1024); "none" keeps it."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * global_batch / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (sqrt_wrt_1024 | linear_wrt_256 | none)")


@dataclass(frozen=True)
class Schedules:
    lr: CosineSchedule
    last_layer_lr: CosineSchedule
    wd: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: LinearWarmupConstant | PerEpoch

    def values(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr(it),
            "last_layer_lr": self.last_layer_lr(it),
            "wd": self.wd(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
        }


def build_schedules(
    *,
    base_lr: float,
    min_lr: float,
    global_batch: int,
    lr_scaling: str,
    epochs: int,
    epoch_length: int,
    warmup_epochs: float,
    freeze_last_layer_epochs: float,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    warmup_teacher_temp: float,
    teacher_temp: float,
    warmup_teacher_temp_epochs: float,
    teacher_temp_warmup: TeacherTempWarmup | str = TeacherTempWarmup.per_iteration,
) -> Schedules:
    total = epochs * epoch_length
    peak = scaled_lr(base_lr, global_batch, lr_scaling)
    warmup = int(round(warmup_epochs * epoch_length))
    freeze = int(round(freeze_last_layer_epochs * epoch_length))
    lr = CosineSchedule(peak, min_lr, total, warmup_iters=warmup)
    # The last layer shares the LR curve but stays at 0 for its frozen iterations (the reference
    # keeps the curve aligned with the main LR instead of shifting it).
    last = CosineSchedule(peak, min_lr, total, warmup_iters=warmup)
    last_layer_lr = _FrozenPrefix(last, freeze)
    wd = CosineSchedule(weight_decay, weight_decay_end, total)
    momentum = CosineSchedule(momentum_teacher, final_momentum_teacher, total)
    if TeacherTempWarmup(teacher_temp_warmup) is TeacherTempWarmup.per_epoch:
        temp = PerEpoch(LinearWarmupConstant(warmup_teacher_temp, teacher_temp, round(warmup_teacher_temp_epochs)),
                        epoch_length)
    else:
        temp = LinearWarmupConstant(warmup_teacher_temp, teacher_temp,
                                    int(round(warmup_teacher_temp_epochs * epoch_length)))
    return Schedules(lr=lr, last_layer_lr=last_layer_lr, wd=wd, momentum=momentum, teacher_temp=temp)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _FrozenPrefix:
    inner: CosineSchedule
    freeze_iters: int

    def __call__(self, it: int) -> float:
        return 0.0 if it < self.freeze_iters else self.inner(it)


def schedules_for(cfg: TrainConfig, world_size: int) -> Schedules:
    """The main phase's schedules of a training config (global batch = per-rank batch × ranks)."""
    o, lo = cfg.optim, cfg.loss
    return build_schedules(
        base_lr=o.base_lr, min_lr=o.min_lr, global_batch=cfg.data.batch_size * world_size, lr_scaling=o.lr_scaling,
        epochs=o.epochs, epoch_length=o.epoch_length, warmup_epochs=o.warmup_epochs,
        freeze_last_layer_epochs=o.freeze_last_layer_epochs, weight_decay=o.weight_decay,
        weight_decay_end=o.weight_decay_end, momentum_teacher=o.momentum_teacher,
        final_momentum_teacher=o.final_momentum_teacher, warmup_teacher_temp=lo.warmup_teacher_temp,
        teacher_temp=lo.teacher_temp, warmup_teacher_temp_epochs=lo.warmup_teacher_temp_epochs,
        teacher_temp_warmup=lo.teacher_temp_warmup,
    )
