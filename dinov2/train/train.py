"""The SSL training loop: data → student/teacher step → AdamW → EMA → metrics → checkpoints.

``run_training(cfg)`` works the same without a launcher (one process, plain modules) and under
``torchrun`` (FSDP2 over gloo on CPU or nccl on CUDA).  It resumes automatically from the latest
complete checkpoint in ``train.output_dir``; the data stream restarts at the sample the interrupted
run would have seen next, and RNG states are restored, so a resumed run reproduces the
uninterrupted one.  A non-finite loss or gradient norm stops the run before the optimizer step,
without saving, so the last good checkpoint is intact.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from dinov2.train import checkpoint as ckpt_lib
from dinov2.train import slurm
from dinov2.train.config import TrainConfig, global_crop_size
from dinov2.train.distributed import DistInfo, barrier, broadcast_object, init_distributed
from dinov2.train.metrics import MetricsLogger, peak_memory_mb
from dinov2.train.param_groups import (ParamGroupRule, apply_last_layer_freeze, apply_schedule, build_param_groups,
                                       init_optimizer_state)
from dinov2.train.schedules import Schedules, build_schedules
from dinov2.train.ssl_meta_arch import NonFiniteLossError, SSLMetaArch, build_backbone, parallelize
from dinov2.utils.config import to_yaml
from dinov2.utils.io import atomic_write_text

log = logging.getLogger("dinov2.train")

# A batch source for tests and custom pipelines: f(rank, world_size, start_sample) -> iterator of
# collated batches (same keys as dinov2.data.collate).  Default: dinov2.data.loader.
BatchSourceFn = Callable[[int, int, int], Iterable[dict[str, Any]]]


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    final_step: int
    last_checkpoint: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # rows logged by this process


def build_optimizer(arch: SSLMetaArch, cfg: TrainConfig) -> torch.optim.AdamW:
    rule = ParamGroupRule(cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult, cfg.optim.wd_exemption)
    groups = build_param_groups(arch.student.named_parameters(), arch.num_layers, rule)
    for g in groups:
        g.pop("names")  # keep the optimizer state dict free of non-tensor lists
    # The fused kernel (CPU and CUDA) updates every tensor in one pass: on the CPU it is ~8x faster than
    # the per-tensor loop (bench/train_step.py), and its state dict is the same as the loop's.
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2), fused=True)
    init_optimizer_state(opt)  # so a dropped-gradient freeze still checkpoints every state
    return opt


def make_schedules(cfg: TrainConfig, world_size: int) -> Schedules:
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


class _DataSource:
    """Wraps the training loader: iterator of batches + bad-image counters."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, start_sample: int, batch_source: BatchSourceFn | None):
        self._counters_fn: Callable[[], dict] | None = None
        if batch_source is not None:
            self._iterable = batch_source(info.rank, info.world_size, start_sample)
        else:
            from dinov2.data.loader import build_train_loader

            loaded = build_train_loader(cfg.data, rank=info.rank, world_size=info.world_size, start_sample=start_sample)
            if isinstance(loaded, tuple):
                self._iterable, counters = loaded[0], loaded[1]
                self._counters_fn = counters if callable(counters) else (lambda: counters)
            else:
                self._iterable = loaded
        if self._counters_fn is None:
            for name in ("bad_sample_counts", "bad_image_counts", "counters"):
                attr = getattr(self._iterable, name, None)
                if attr is not None:
                    self._counters_fn = attr if callable(attr) else (lambda a=attr: a)
                    break
        self._it: Iterator = iter(self._iterable)
        # Pull the first batch now: lazy iterators start their DataLoader (and draw its worker seed
        # from torch's global RNG) on the first next(); the caller isolates that RNG use.
        self._first: dict[str, Any] | None = self._pull()

    def _pull(self) -> dict[str, Any]:
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError("the training data stream ended (the loader should be infinite)") from None

    def next(self) -> dict[str, Any]:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError("the training data stream ended (the loader should be infinite)") from None

    def bad_images(self) -> dict[str, int]:
        if self._counters_fn is None:
            return {}
        try:
            return {str(k): int(v) for k, v in dict(self._counters_fn()).items()}
        except Exception:  # counters are informative only
            return {}


def _set_threads(cfg: TrainConfig) -> None:
    if cfg.compute.num_threads > 0:
        torch.set_num_threads(cfg.compute.num_threads)
    if cfg.compute.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def _seed_all(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def full_teacher_backbone_state(arch: SSLMetaArch) -> dict[str, torch.Tensor]:
    """Collective: unsharded teacher backbone weights on every rank (CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(arch.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    prefix = "backbone."
    return {k[len(prefix):]: v.detach().cpu() for k, v in full.items() if k.startswith(prefix)}


def _eval_during_training(arch: SSLMetaArch, cfg: TrainConfig, info: DistInfo, cache: dict) -> dict[str, float]:
    """k-NN (and optionally linear) accuracy of the teacher backbone; computed on rank 0."""
    state = full_teacher_backbone_state(arch)  # collective
    results: dict[str, float] = {}
    if info.is_main:
        from dinov2.eval.run import evaluate_backbone

        backbone = build_backbone(cfg.model, global_crop_size(cfg), 0.0)
        backbone.load_state_dict(state)
        backbone.to(info.device)
        results = evaluate_backbone(backbone, cfg.eval, info.device, cache=cache)
    barrier()
    return broadcast_object(results)


def run_training(cfg: TrainConfig, batch_source: BatchSourceFn | None = None,
                 info: DistInfo | None = None, phase: Any = None) -> TrainResult:
    # Multi-phase runs (high-resolution finishing): dinov2.train.phases runs each phase through
    # this function with a PhasePlan (its steps, schedules, data position, metrics tag).
    if phase is None and cfg.phases.highres.steps > 0:
        from dinov2.train.phases import run_phases

        return run_phases(cfg, batch_source, info)
    phase_name = phase.name if phase is not None else "main"
    info = info or init_distributed(cfg.compute.device)
    _set_threads(cfg)
    run_dir = Path(cfg.train.output_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt_lib.remove_stale_tmp(run_dir)
        atomic_write_text(run_dir / (phase.config_name if phase is not None else "config.yaml"), to_yaml(cfg))
    barrier()

    # Same seed on every rank for the initial weights (FSDP then keeps each rank's shard).
    _seed_all(cfg.train.seed)
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, global_crop_size(cfg))
    if cfg.distill.teacher_checkpoint:
        from dinov2.train.distill import attach_frozen_teacher

        attach_frozen_teacher(arch, cfg)  # frozen large teacher; arch.teacher becomes the student EMA
    parallelize(arch, info.device, cfg.compute.precision, cfg.compute.fsdp,
                cfg.compute.activation_checkpointing, cfg.compute.compile)
    optimizer = build_optimizer(arch, cfg)
    schedules = make_schedules(cfg, info.world_size)
    global_batch = cfg.data.batch_size * info.world_size
    freeze_iters = int(round(cfg.optim.freeze_last_layer_epochs * cfg.optim.epoch_length))
    total_steps = cfg.total_steps
    if phase is not None:
        total_steps = phase.end_step
        schedules = phase.schedules or schedules
        freeze_iters = freeze_iters if phase.freeze_last_layer else 0

    latest = broadcast_object(str(ckpt_lib.latest_checkpoint(run_dir) or "") if info.is_main else None)
    start_step, start_sample = 0, 0
    if phase is not None and phase.start_step > 0 and not latest:
        raise RuntimeError(f"phase {phase.name!r} needs the checkpoint of step {phase.start_step}; none found")
    if latest:
        meta = ckpt_lib.load_checkpoint(latest, arch, optimizer)
        start_step = int(meta["step"])
        start_sample = phase.data_sample(start_step) if phase is not None else start_step * cfg.data.batch_size
        if int(meta.get("world_size", info.world_size)) != info.world_size:
            log.warning("resuming a %s-rank checkpoint on %d ranks: weights/optimizer are resharded; the data "
                        "stream continues at step %d of the new rank layout", meta.get("world_size"),
                        info.world_size, start_step)
        if int(meta.get("world_size", info.world_size)) != info.world_size or not (
            Path(latest) / f"rng_rank{info.rank}.pt"
        ).is_file():
            _seed_all(cfg.train.seed * 100_003 + start_step * 1_009 + info.rank)
        if info.is_main:
            log.info("resumed from %s (step %d)", latest, start_step)
    else:
        # Per-rank streams for drop-path etc. (weights are already initialised identically).
        _seed_all(cfg.train.seed * 100_003 + info.rank)

    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.train.tensorboard)
    logger.truncate_after(start_step)
    # Creating the DataLoader iterator draws from torch's global RNG (worker base seed): do it in a
    # forked RNG with a fixed seed so a resumed run's RNG stream (drop path …) matches the original.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed * 100_003 + 17 + info.rank)
        data = _DataSource(cfg, info, start_sample, batch_source)

    pbar = None
    if info.is_main and cfg.train.progress:
        from tqdm import tqdm

        pbar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    result = TrainResult(run_dir, start_step, start_step, Path(latest) if latest else None)
    eval_cache: dict = {}
    last_layer = arch.last_layer_params()
    step = start_step
    try:
        while step < total_steps:
            t0 = time.perf_counter()
            batch = data.next()
            t_data = time.perf_counter() - t0
            vals = schedules.values(step)
            apply_schedule(optimizer, vals["lr"], vals["wd"], vals["last_layer_lr"])
            optimizer.zero_grad(set_to_none=True)

            out = arch.forward_loss(batch, vals["teacher_temp"])
            out.loss.backward()
            norms = arch.clip_gradients(cfg.optim.clip_grad, cfg.optim.clip_grad_rule)
            apply_last_layer_freeze(last_layer, cfg.optim.freeze_last_layer_mode, frozen=step < freeze_iters)

            names = sorted(out.terms)
            local = torch.stack([out.terms[n].float().to(info.device) for n in names])
            reduced = local.clone()
            if dist.is_initialized():
                dist.all_reduce(reduced)
                reduced /= dist.get_world_size()
            terms = dict(zip(names, reduced.cpu().tolist()))
            bad_norm = [k for k, v in norms.items() if not math.isfinite(v)]
            if not all(math.isfinite(v) for v in terms.values()) or bad_norm:
                where = ", ".join(f"{k}={v}" for k, v in {**terms, **norms}.items() if not math.isfinite(v))
                last = ckpt_lib.latest_checkpoint(run_dir)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1} ({where}); stopping without saving. "
                    f"Last good checkpoint: {last or 'none'}. Lower the learning rate, check the data, "
                    f"or use fp32/bf16 instead of fp16."
                )
            optimizer.step()
            arch.update_teacher(vals["momentum"])
            step += 1
            dt = time.perf_counter() - t0

            if info.is_main and (step % cfg.train.log_every == 0 or step == total_steps):
                row: dict[str, Any] = {
                    "step": step,
                    "phase": phase_name,
                    "epoch": (step - 1) // cfg.optim.epoch_length,
                    **terms,
                    **vals,
                    **norms,
                    **out.stats,
                    "images_per_s": global_batch / dt if dt > 0 else float("nan"),
                    "step_time_s": dt,
                    "data_time_s": t_data,
                    "peak_memory_mb": peak_memory_mb(info.device),
                    "world_size": info.world_size,
                }
                koleo_guards = getattr(arch.koleo_loss, "guard_counts", None)
                if koleo_guards:
                    row.update({f"koleo_guard_{k}": v for k, v in koleo_guards.items()})
                row.update({f"bad_images_{k}": v for k, v in data.bad_images().items()})
                logger.log(row)
                result.metrics.append(row)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{terms['total_loss']:.3f}", lr=f"{vals['lr']:.2e}")

            if cfg.eval.every_n_steps > 0 and step % cfg.eval.every_n_steps == 0:
                ev = _eval_during_training(arch, cfg, info, eval_cache)
                if info.is_main:
                    row = {"step": step, "phase": phase_name, **{f"eval_{k}": v for k, v in ev.items()}}
                    logger.log(row)
                    result.metrics.append(row)

            periodic = step % cfg.checkpoint.every_n_steps == 0 or (step == total_steps and cfg.checkpoint.save_final)
            # Preemption (SLURM's USR1/TERM, recorded by the CLI's handler): save at this step boundary,
            # then requeue; every rank polls at the same step so all of them save together.
            preempted = slurm.preemption_handler_installed() and slurm.preemption_requested()
            if periodic or preempted:
                # Rank-local samples consumed (the loader's start_sample on resume).
                meta = {"data_sample": start_sample + (step - start_step) * cfg.data.batch_size,
                        "global_batch": global_batch, "schedule": vals, "phase": phase_name}
                result.last_checkpoint = ckpt_lib.save_checkpoint(
                    run_dir, step, arch, optimizer, meta, cfg.checkpoint.keep_last)
            if preempted:
                log.warning("preemption signal received: checkpoint saved at step %d, requeueing", step)
                slurm.requeue_and_exit()
        if cfg.eval.at_end and cfg.eval.train_dir and cfg.eval.val_dir:
            ev = _eval_during_training(arch, cfg, info, eval_cache)
            if info.is_main:
                row = {"step": step, "phase": phase_name, **{f"eval_{k}": v for k, v in ev.items()}}
                logger.log(row)
                result.metrics.append(row)
    finally:
        if pbar is not None:
            pbar.close()
        logger.close()
    result.final_step = step
    return result
