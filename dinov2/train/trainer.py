"""The trainer of one phase: setup → train_step … → checkpoint, with its data position as state.

``Trainer(cfg, plan, info, batch_source).fit()`` trains the steps ``plan.start_step+1 ..
plan.end_step``, resuming from the latest complete checkpoint in ``train.output_dir``: weights,
optimizer, centers, RNG states and the data stream's true position (what the loader reports, so
batches the loader dropped are not seen twice) are restored, and a resumed run reproduces the
uninterrupted one bit for bit.  Phases are chosen and chained outside (dinov2.train.train).

Host syncs: a step (``train_step``) only queues device work.  The host waits for the device only
at *sync steps* — log steps, checkpoint steps, the last step — where one all-reduce and one
transfer bring the loss terms, the non-finite flag and the preemption flag across (see ``_sync``).
A non-finite step is skipped on the device (fused AdamW ``found_inf``) and reported at the next
sync, before anything is saved (dinov2.train.guard, dinov2.train.checkpoint).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from dinov2.run import preemption
from dinov2.train import checkpoint as ckpt_lib
from dinov2.train.build import build_arch, build_optimizer, seed_all, set_threads
from dinov2.train.config import TrainConfig
from dinov2.train.data_source import BatchSourceFn, TrainData
from dinov2.train.distributed import DistInfo, barrier, broadcast_object
from dinov2.train.evaluation import evaluate_teacher
from dinov2.train.guard import NonFiniteLossError, StepGuard, tensors_finite
from dinov2.train.metrics import MetricsLogger, StepWindow, peak_memory_mb
from dinov2.train.param_groups import apply_last_layer_freeze, apply_schedule
from dinov2.train.phases import PhasePlan
from dinov2.train.run_dir import prepare_run_dir
from dinov2.train.ssl_meta_arch import StepOutput, parallelize

log = logging.getLogger("dinov2.train")


@dataclass
class TrainResult:
    run_dir: Path
    start_step: int
    final_step: int
    last_checkpoint: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)  # rows logged by this process


@dataclass
class StepResult:
    out: StepOutput
    norms: dict[str, torch.Tensor]  # pre-clip gradient norms (device)
    vals: dict[str, float]  # schedule values used


class Trainer:
    def __init__(self, cfg: TrainConfig, plan: PhasePlan, info: DistInfo, batch_source: BatchSourceFn | None = None):
        self.cfg, self.plan, self.info = cfg, plan, info
        self.run_dir = Path(cfg.train.output_dir)
        self.batch_source = batch_source
        self.global_batch = cfg.data.batch_size * info.world_size
        self.step = plan.start_step
        # Newest checkpoint not yet verified by a finite step after it, and its step.
        self.pending: tuple[Path, int] | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, info = self.cfg, self.info
        set_threads(cfg)
        self._prepare_run_dir()
        seed_all(cfg.train.seed)  # same seed on every rank for the initial weights (FSDP keeps shards)
        self.arch = build_arch(cfg)
        parallelize(self.arch, info.device, cfg.compute.precision, cfg.compute.fsdp,
                    cfg.compute.activation_checkpointing, cfg.compute.compile)
        self.optimizer = build_optimizer(self.arch, cfg)
        self.guard = StepGuard(info.device)
        self.optimizer.found_inf = self.guard.found_inf  # read by the fused AdamW kernel
        self.last_layer = self.arch.last_layer_params()
        freeze = int(round(cfg.optim.freeze_last_layer_epochs * cfg.optim.epoch_length))
        self.freeze_iters = freeze if self.plan.freeze_last_layer else 0
        self.start_step, start_sample, self.last_checkpoint = self._resume()
        self.step = self.start_step
        self.logger = MetricsLogger(self.run_dir, enabled=info.is_main, tensorboard=cfg.train.tensorboard)
        self.logger.truncate_after(self.step)
        # Creating the DataLoader iterator draws from torch's global RNG (worker base seed): do it in a
        # forked RNG with a fixed seed so a resumed run's RNG stream (drop path …) matches the original.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed * 100_003 + 17 + info.rank)
            self.data = TrainData(cfg.data, info, start_sample, self.batch_source)
        self.window = StepWindow()
        self.eval_cache: dict = {}

    def _prepare_run_dir(self) -> None:
        """Lock the run folder, refuse a changed architecture, drop half-written checkpoints and
        record the config (dinov2.train.run_dir), in that order."""
        self.lock = prepare_run_dir(self.cfg, self.info, self.plan.config_name)

    def close(self) -> None:
        """Release the run folder (also after a failed setup or step)."""
        lock, self.lock = getattr(self, "lock", None), None
        if lock is not None:
            lock.release()

    def _resume(self) -> tuple[int, int, Path | None]:
        """(step, rank-local data position, checkpoint) to continue from."""
        info, plan, seed = self.info, self.plan, self.cfg.train.seed
        latest = broadcast_object(str(ckpt_lib.latest_intact_checkpoint(self.run_dir) or "") if info.is_main else None)
        if not latest:
            if plan.start_step > 0:
                raise RuntimeError(f"phase {plan.name!r} needs the checkpoint of step {plan.start_step}; none found")
            seed_all(seed * 100_003 + info.rank)  # per-rank streams (drop path …); weights are already equal
            return plan.start_step, 0, None
        meta = ckpt_lib.load_checkpoint(latest, self.arch, self.optimizer)
        step, saved_world = int(meta["step"]), int(meta.get("world_size", info.world_size))
        if saved_world != info.world_size or not (Path(latest) / f"rng_rank{info.rank}.pt").is_file():
            seed_all(seed * 100_003 + step * 1_009 + info.rank)
        self.pending = None if ckpt_lib.is_verified(latest) else (Path(latest), step)
        if info.is_main:
            log.info("resumed from %s (step %d)", latest, step)
        return step, self._resumed_position(meta, step, saved_world), Path(latest)

    def _resumed_position(self, meta: dict[str, Any], step: int, saved_world: int) -> int:
        info, plan, B = self.info, self.plan, self.cfg.data.batch_size
        if saved_world != info.world_size:
            log.warning("resuming a %d-rank checkpoint on %d ranks: weights/optimizer are resharded; the data "
                        "stream continues at step %d of the new rank layout", saved_world, info.world_size, step)
            return plan.first_sample(plan.start_step * B) + (step - plan.start_step) * B
        positions = meta.get("data_samples") or [int(meta.get("data_sample", step * B))] * info.world_size
        own = int(positions[info.rank])
        return own if meta.get("phase", plan.name) == plan.name else plan.first_sample(own)

    # ------------------------------------------------------------------- loop
    def fit(self) -> TrainResult:
        result = TrainResult(self.run_dir, self.start_step, self.start_step, self.last_checkpoint)
        self.result = result
        pbar = None
        if self.info.is_main and self.cfg.train.progress:
            pbar = tqdm(total=self.plan.end_step, initial=self.step, desc="train", dynamic_ncols=True)
        try:
            while self.step < self.plan.end_step:
                t0 = time.perf_counter()
                batch = self.data.next()
                self.window.add_data_time(time.perf_counter() - t0)
                sync = self._is_sync_step(self.step + 1)
                res = self.train_step(batch, with_stats=sync)
                self.step += 1
                if pbar is not None:
                    pbar.update(1)
                if sync:
                    self._sync(res, pbar)
                if self.cfg.eval.every_n_steps > 0 and self.step % self.cfg.eval.every_n_steps == 0:
                    self._evaluate()
            if self.cfg.eval.at_end and self.cfg.eval.train_dir and self.cfg.eval.val_dir:
                self._evaluate()
        finally:
            if pbar is not None:
                pbar.close()
            self.logger.close()
        result.final_step = self.step
        return result

    def train_step(self, batch: dict[str, Any], with_stats: bool = False) -> StepResult:
        """One optimisation step (iteration ``self.step``); queues device work, never waits for it."""
        it = self.step
        vals = self.plan.schedules.values(it)
        apply_schedule(self.optimizer, vals["lr"], vals["wd"], vals["last_layer_lr"])
        self.optimizer.zero_grad(set_to_none=True)
        out = self.arch.forward_loss(batch, vals["teacher_temp"], with_stats=with_stats)
        out.loss.backward()
        norms = self.arch.clip_gradients(self.cfg.optim.clip_grad, self.cfg.optim.clip_grad_rule)
        apply_last_layer_freeze(self.last_layer, self.cfg.optim.freeze_last_layer_mode, frozen=it < self.freeze_iters)
        self.guard.check(it + 1, [*out.terms.values(), *norms.values()])  # sets optimizer.found_inf
        self.optimizer.step()  # skipped on the device when found_inf is set
        self.arch.update_teacher(vals["momentum"])
        return StepResult(out, norms, vals)

    def _is_sync_step(self, step: int) -> bool:
        c = self.cfg
        return (step % c.train.log_every == 0 or step % c.checkpoint.every_n_steps == 0
                or step == self.plan.end_step)

    # ------------------------------------------------------------------- sync
    def _sync(self, res: StepResult, pbar: tqdm | None) -> None:
        """The one host sync: loss terms (mean over ranks), non-finite and preemption flags."""
        step, c = self.step, self.cfg
        names = sorted(res.out.terms)
        flags = torch.stack([(self.guard.first_bad > 0).float(),
                             torch.tensor(float(preemption.requested_locally()), device=self.info.device)])
        shared = torch.cat([torch.stack([res.out.terms[n].float() for n in names]), flags])
        if dist.is_initialized():
            dist.all_reduce(shared)
        local = [*res.norms.values(), *res.out.stats.values()]
        host = torch.cat([shared, torch.stack(local).float() if local else shared[:0]]).tolist()
        world = dist.get_world_size() if dist.is_initialized() else 1
        terms = {n: v / world for n, v in zip(names, host)}
        bad, preempted = host[len(names)] > 0, host[len(names) + 1] > 0
        if bad:
            self._stop_non_finite(terms)
        self._verify_pending()
        if self.info.is_main and (step % c.train.log_every == 0 or step == self.plan.end_step):
            extra = dict(zip([*res.norms, *res.out.stats], host[len(names) + 2:]))
            row = self._row(res.vals, terms, extra)
            self.logger.log(row)
            self.result.metrics.append(row)
            if pbar is not None:
                pbar.set_postfix(loss=f"{terms['total_loss']:.3f}", lr=f"{res.vals['lr']:.2e}")
        periodic = step % c.checkpoint.every_n_steps == 0 or (step == self.plan.end_step and c.checkpoint.save_final)
        if periodic or preempted:
            self.checkpoint(res.vals)
        if preempted:
            log.warning("preemption signal received: checkpoint saved at step %d, requeueing", step)
            preemption.requeue_and_exit()

    def _row(self, vals: dict[str, float], terms: dict[str, float], extra: dict[str, float]) -> dict[str, Any]:
        dt, data_dt = self.window.take()
        return {
            "step": self.step, "phase": self.plan.name, "epoch": (self.step - 1) // self.cfg.optim.epoch_length,
            **terms, **vals, **extra,  # extra: gradient norms and monitors (rank 0's values)
            "images_per_s": self.global_batch / dt if dt > 0 else float("nan"), "step_time_s": dt,
            "data_time_s": data_dt, "peak_memory_mb": peak_memory_mb(self.info.device),
            "world_size": self.info.world_size,
            **{f"koleo_guard_{k}": v for k, v in self.arch.koleo_loss.guard_counts.items()},
            **{f"bad_images_{k}": v for k, v in self.data.bad_images().items()},
        }

    def _verify_pending(self) -> None:
        """A sync without a non-finite step since the pending checkpoint: its weights were good."""
        if self.pending is not None and self.step > self.pending[1]:
            if self.info.is_main:
                ckpt_lib.mark_verified(self.pending[0], self.step)
            self.pending = None

    def _stop_non_finite(self, terms: dict[str, float]) -> None:
        first = int(self.guard.first_bad)
        where = f"step {first}" if first > 0 else f"a step up to {self.step} (on another rank)"
        bad_terms = ", ".join(f"{k}={v}" for k, v in terms.items() if not math.isfinite(v))
        good = None
        if self.info.is_main:
            good = ckpt_lib.newest_verified(self.run_dir)
            moved = ckpt_lib.set_aside_unverified(self.run_dir, good)
            if moved:
                log.warning("moved unverified checkpoints aside: %s", ", ".join(p.name for p in moved))
        good = broadcast_object(str(good) if good else "")
        barrier()
        raise NonFiniteLossError(
            f"non-finite loss or gradient at {where}{f' ({bad_terms})' if bad_terms else ''}; stopping without "
            f"saving. Last good checkpoint: {good or 'none'}. Lower the learning rate, check the data, "
            f"or use fp32/bf16 instead of fp16.")

    # ------------------------------------------------------------- checkpoint
    def checkpoint(self, vals: dict[str, float]) -> Path:
        """Collective: save after checking the state is finite; records every rank's data position."""
        a, opt = self.arch, self.optimizer
        state = [*a.student.parameters(), *a.teacher.parameters(), *a.center_state_dict().values(),
                 *(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v))]
        ok = tensors_finite(getattr(t, "_local_tensor", t) for t in state).float().to(self.info.device)
        positions = torch.zeros(self.info.world_size, dtype=torch.float64, device=self.info.device)
        positions[self.info.rank] = self.data.state_dict()["next_sample"]
        if dist.is_initialized():
            ok = ok.reshape(1)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            dist.all_reduce(positions)
        if float(ok.reshape(())) < 1:
            self._stop_non_finite({})
        meta = {"data_sample": int(positions[0]), "data_samples": [int(p) for p in positions.tolist()],
                "global_batch": self.global_batch, "schedule": vals, "phase": self.plan.name}
        path = ckpt_lib.save_checkpoint(self.run_dir, self.step, a, opt, meta, self.cfg.checkpoint.keep_last)
        self.pending = (path, self.step)
        self.result.last_checkpoint = path
        return path

    def _evaluate(self) -> None:
        ev = evaluate_teacher(self.arch, self.cfg, self.info, self.eval_cache)
        if self.info.is_main:
            row = {"step": self.step, "phase": self.plan.name, **{f"eval_{k}": v for k, v in ev.items()}}
            self.logger.log(row)
            self.result.metrics.append(row)
