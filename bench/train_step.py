"""Training-step throughput on this machine: images/s and achieved FLOP/s relative to the FLOP/s of
a 4096³ fp32 matmul measured in the same process.

One step = ``Trainer.train_step``, the trainer's own step: teacher forward (2 global crops) + student
packed forward/backward (2 global + local crops, heads, DINO + iBOT + KoLeo) + gradient clipping +
the device-side non-finite check + AdamW + EMA update (single process, fp32), on a step that does not
log (a log step adds the monitors and one host sync).  FLOPs of one step are counted with
torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and attention; elementwise ops are
not counted, so the ratio is a lower bound of the real utilisation).

    .venv/bin/python bench/train_step.py [--steps 3] [--only tiny|vits14|vitb14] [--compile] [--batch B]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinov2.train.config import load_train_config  # noqa: E402
from dinov2.train.distributed import DistInfo  # noqa: E402
from dinov2.train.phases import plans  # noqa: E402
from dinov2.train.trainer import Trainer  # noqa: E402


def matmul_flops_per_s(n: int = 4096, reps: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def make_batch(B: int, gsize: int, lsize: int, n_local: int, patch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = (gsize // patch) ** 2
    masks = torch.rand(2 * B, n, generator=g) < 0.3
    masks[B:] = False  # half of the samples masked, like the collate
    per_image = 1.0 / masks.sum(-1).clamp(min=1).float()
    return {  # the collate's keys, masked-patch indices and weights included
        "collated_global_crops": torch.randn(2 * B, 3, gsize, gsize, generator=g),
        "collated_local_crops": torch.randn(n_local * B, 3, lsize, lsize, generator=g),
        "collated_masks": masks,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": per_image[:, None].expand_as(masks)[masks],
    }


def make_trainer(config: str, batch: int, precision: str, compile_blocks: bool) -> tuple[Trainer, dict]:
    tmp = tempfile.mkdtemp(prefix="train_step_bench_")
    cfg = load_train_config(REPO / "configs" / "train" / config, [
        f"train.output_dir={tmp}", "model.drop_path_rate=0.0", "train.progress=false", "train.tensorboard=false",
        f"compute.precision={precision}", "compute.device=cpu", f"data.batch_size={batch}", "optim.warmup_epochs=0",
        f"compute.compile={str(compile_blocks).lower()}"])
    c = cfg.data.crops
    data = make_batch(batch, c.global_crops_size, c.local_crops_size, c.local_crops_number, cfg.model.patch_size)
    trainer = Trainer(cfg, plans(cfg, 1)[0][0], DistInfo(), batch_source=lambda r, w, s: itertools.repeat(data))
    trainer.setup()
    return trainer, data


def bench(name: str, config: str, batch: int, steps: int, precision: str = "fp32", compile_blocks: bool = False) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs are counted on an eager step (the counter sees aten ops; compiled blocks run the same math).
    trainer, data = make_trainer(config, batch, precision, compile_blocks=False)
    with FlopCounterMode(display=False) as fc:
        trainer.train_step(data)  # also the warm-up
    flops = fc.get_total_flops()
    if compile_blocks:
        trainer.close()
        trainer, data = make_trainer(config, batch, precision, compile_blocks=True)
        for _ in range(2):  # compile (student, teacher), then one step on warm caches
            trainer.train_step(data)

    def step() -> None:
        trainer.train_step(data)

    times, paired = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        # On a shared machine the matmul rate itself swings ~2x within minutes: each step is also
        # compared with a matmul timed right after it, and the median of those ratios is reported.
        paired.append(flops / times[-1] / matmul_flops_per_s(reps=1))
    t = min(times)
    return {"name": name, "batch": batch, "step_s": t, "images_per_s": batch / t, "gflop_per_step": flops / 1e9,
            "achieved_flops": flops / t, "precision": precision + (" + compile" if compile_blocks else ""),
            "paired_ratio": statistics.median(paired)}


def main() -> None:
    import os

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", choices=["tiny", "vits14", "vitb14"], default=None,
                    help="one config (default: tiny and vits14; vitb14 only when asked: ~4x the ViT-S step)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--compile", action="store_true", help="compute.compile=true (torch.compile per block)")
    ap.add_argument("--batch", type=int, default=None, help="images per step (default: 32 tiny, 4 ViT-S/14 and ViT-B/14)")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    runs = []
    if args.only in (None, "tiny"):
        runs.append(("tiny (ViT dim 192 depth 6, 2×84 + 4×42, head 4096)", "tiny.yaml", args.batch or 32))
    if args.only in (None, "vits14"):
        runs.append(("ViT-S/14 (2×224 + 8×98, head 65536)", "vits14.yaml", args.batch or 4))
    if args.only == "vitb14":  # wider GEMMs (768 vs 384): does the ratio follow the GEMM shapes?
        runs.append(("ViT-B/14 (2×224 + 8×98, head 65536)", "vitb14.yaml", args.batch or 4))
    print("| config | precision | batch | step (s) | images/s | GFLOP/step | achieved GFLOP/s | matmul GFLOP/s "
          "| ÷ matmul rate | median per-step ÷ next matmul |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, config, batch in runs:
        # The matmul baseline is measured right before and after each config (the machine is shared,
        # so a baseline from another moment would not be comparable); their mean is the reference.
        m0 = matmul_flops_per_s()
        r = bench(name, config, batch, args.steps, args.precision, args.compile)
        m1 = matmul_flops_per_s()
        peak = (m0 + m1) / 2
        print(f"| {r['name']} | {r['precision']} | {r['batch']} | {r['step_s']:.2f} | {r['images_per_s']:.2f} | "
              f"{r['gflop_per_step']:.1f} | {r['achieved_flops'] / 1e9:.1f} | {peak / 1e9:.1f} "
              f"({m0 / 1e9:.0f}/{m1 / 1e9:.0f}) | {r['achieved_flops'] / peak:.2f} | {r['paired_ratio']:.2f} |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
