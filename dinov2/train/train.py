"""``run_training(cfg)``: run every phase of a training config, one :class:`Trainer` per phase.

The phases (dinov2.train.phases: the main SSL phase, then an optional high-resolution one) are
planned here and driven from outside the trainer; each phase's trainer resumes from the latest
complete checkpoint of the run folder, and phases a previous run completed are skipped.  Works the
same without a launcher (one process, plain modules) and under ``torchrun`` (FSDP2 over gloo on
CPU or nccl on CUDA).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dinov2.train import checkpoint as ckpt_lib
from dinov2.train.config import TrainConfig
from dinov2.train.data_source import BatchSourceFn
from dinov2.train.distributed import DistInfo, broadcast_object, init_distributed
from dinov2.train.phases import plans
from dinov2.train.trainer import Trainer, TrainResult

__all__ = ["TrainResult", "run_training"]


def run_training(cfg: TrainConfig, batch_source: BatchSourceFn | Mapping[str, BatchSourceFn] | None = None,
                 info: DistInfo | None = None) -> TrainResult:
    """Train every configured phase back to back.

    ``batch_source``: one source for all phases, or ``{phase name: source}`` (a custom source must
    yield the crop sizes of its phase); None → the real loader built from each phase's config.
    """
    info = info or init_distributed(cfg.compute.device)
    latest = broadcast_object(str(ckpt_lib.latest_intact_checkpoint(cfg.train.output_dir, warn=False) or "")
                              if info.is_main else None)
    done_step = int(ckpt_lib.read_meta(latest)["step"]) if latest else 0

    result: TrainResult | None = None
    first_start: int | None = None
    rows: list[dict[str, Any]] = []
    for plan, phase_cfg in plans(cfg, info.world_size):
        if done_step >= plan.end_step:
            continue  # finished by an earlier run
        if plan.start_step > 0 and done_step < plan.start_step:
            raise RuntimeError(f"phase {plan.name!r} starts at step {plan.start_step} but the latest checkpoint is "
                               f"at step {done_step}: the previous phase did not finish")
        source = batch_source.get(plan.name) if isinstance(batch_source, Mapping) else batch_source
        trainer = Trainer(phase_cfg, plan, info, source)
        try:
            trainer.setup()
            result = trainer.fit()
        finally:
            trainer.close()  # the run folder's lock
        first_start = result.start_step if first_start is None else first_start
        rows.extend(result.metrics)
        done_step = result.final_step
    if result is None:  # everything was already done: report the final state without training
        return TrainResult(Path(cfg.train.output_dir), done_step, done_step, Path(latest) if latest else None)
    result.start_step = first_start if first_start is not None else result.start_step
    result.metrics = rows
    return result
