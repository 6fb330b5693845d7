"""``dinov2`` console script.

    dinov2 train -c configs/train/tiny.yaml train.output_dir=runs/tiny key=value …
    dinov2 export RUN_DIR_OR_CKPT OUT.pth [--format official|hf|timm]   teacher backbone (.safetensors too)
    dinov2 features --weights W --input DIR_OR_SHARDS --out OUT [--format npy|parquet]
    dinov2 eval knn --weights W --train-dir D --val-dir D [--resize 256 --crop 224]
    dinov2 eval linear --weights W --train-dir D --val-dir D

``--weights`` is a backbone file (official or ours, any layout ``load_pretrained`` reads) or a run /
checkpoint folder (its teacher backbone).  Exit codes: 0 ok, 2 bad config/input or a file-system
error (one line on stderr; ``DINOV2_TRACEBACK=1`` shows the traceback), 3 non-finite loss.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch


def _cmd_train(args: argparse.Namespace) -> int:
    from dinov2.run import preemption
    from dinov2.run.config import Launcher
    from dinov2.train.config import load_train_config
    from dinov2.train.guard import NonFiniteLossError
    from dinov2.train.train import run_training

    cfg = load_train_config(args.config, args.overrides)
    if cfg.train.launcher == Launcher.slurm:
        from dinov2.run.submit import submit_training

        job = submit_training(cfg, args.overrides)
        print(f"submitted SLURM job {job.job_id}; run folder {cfg.train.output_dir} (resumes automatically)")
        return 0

    # SLURM's USR1 (time limit) / TERM (preemption) → checkpoint at the next sync step + requeue.
    preemption.install_preemption_handler()
    try:
        result = run_training(cfg)
    except NonFiniteLossError as exc:
        print(f"dinov2 train: stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        from dinov2.train.distributed import destroy

        destroy()
    print(f"trained steps {result.start_step}..{result.final_step}; last checkpoint: {result.last_checkpoint}")
    return 0


def load_backbone_weights(path: str | Path) -> torch.nn.Module:
    """A plain backbone from a weights file or from a run/checkpoint folder's teacher."""
    from dinov2.models.checkpoint import load_pretrained

    # Run folders: the head count and position-resize mode come from the run's config.yaml.
    return load_pretrained(path)


def _cmd_export(args: argparse.Namespace) -> int:
    from dinov2.models.export import export_weights

    res = export_weights(load_backbone_weights(args.source), args.out, args.format)
    for note in res.notes:
        print(note, file=sys.stderr)
    print(f"wrote {res.path} ({args.format}): {res.tensors} tensors, {res.parameters / 1e6:.2f}M parameters")
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from dinov2.eval.extract import ExtractConfig, extract_to_folder
    from dinov2.models.checkpoint import load_pretrained

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    model = load_pretrained(args.weights, **overrides).to(device)
    cfg = ExtractConfig(resize_size=args.resize, crop_size=args.crop, batch_size=args.batch_size,
                        num_workers=args.num_workers, patch=not args.cls_only, format=args.format)
    res = extract_to_folder(model, args.input, args.out, cfg, device, weights=str(args.weights))
    print(f"wrote {res.out_dir}: {res.written}/{res.images} images, dim {res.dim}, patch grid "
          f"{res.grid[0]}x{res.grid[1]}" + (f", skipped {dict(res.bad)}" if res.bad else ""))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from dinov2.eval.linear import LinearProbeConfig
    from dinov2.eval.run import evaluate_backbone

    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    model = load_backbone_weights(args.weights).to(device)
    eval_cfg = argparse.Namespace(
        train_dir=args.train_dir, val_dir=args.val_dir, resize_size=args.resize, crop_size=args.crop,
        batch_size=args.batch_size, num_workers=args.num_workers, ks=args.ks, temperature=args.temperature,
        linear=args.kind == "linear",
    )
    linear_cfg = LinearProbeConfig(lrs=args.lrs, epochs=args.epochs) if args.kind == "linear" else None
    res = evaluate_backbone(model, eval_cfg, device, linear_cfg=linear_cfg)
    if args.kind == "linear":
        res = {k: v for k, v in res.items() if not k.startswith("knn_")}
    print(json.dumps(res, indent=2, sort_keys=True))
    if args.out:
        from dinov2.utils.io import atomic_write_json

        atomic_write_json(args.out, res)
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinov2", description="DINOv2-style SSL training and evaluation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (resumes automatically from train.output_dir)")
    t.add_argument("-c", "--config", required=True, help="YAML config, e.g. configs/train/tiny.yaml")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.output_dir=runs/x")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("export", help="write a backbone (a run's teacher) for torch.hub, transformers or timm")
    e.add_argument("source", help="run folder, checkpoint folder (ckpt/step_XXXXXX) or any weights load_pretrained reads")
    e.add_argument("out", help="output .pth or .safetensors (official, timm) or folder (hf)")
    e.add_argument("--format", default="official", choices=["official", "hf", "timm"])
    e.set_defaults(func=_cmd_export)

    f = sub.add_parser("features", help="CLS + patch features of an image folder or shards (.npy / Parquet)")
    f.add_argument("--weights", required=True, help="backbone file, HF folder or run/checkpoint folder")
    f.add_argument("--input", required=True, help="image folder (recursive) or tar shards (folder, glob, {a..b})")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--format", default="npy", choices=["npy", "parquet"])
    f.add_argument("--cls-only", action="store_true", help="skip the patch tokens")
    f.add_argument("--resize", type=int, default=256)
    f.add_argument("--crop", type=int, default=224)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--num-workers", type=int, default=0)
    f.add_argument("--num-heads", type=int, default=0, help="head count for a .pth that cannot record it")
    f.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    f.set_defaults(func=_cmd_features)

    ev = sub.add_parser("eval", help="k-NN or linear evaluation on frozen features")
    evs = ev.add_subparsers(dest="kind", required=True)
    for kind in ("knn", "linear"):
        k = evs.add_parser(kind)
        k.add_argument("--weights", required=True, help="backbone .pth (official/ours) or run/checkpoint folder")
        k.add_argument("--train-dir", required=True, help="class-subfolder image folder or tar shards (.cls/.json)")
        k.add_argument("--val-dir", required=True)
        k.add_argument("--resize", type=_positive_int, default=256)
        k.add_argument("--crop", type=_positive_int, default=224)
        k.add_argument("--batch-size", type=_positive_int, default=64)
        k.add_argument("--num-workers", type=int, default=0)
        k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        k.add_argument("--ks", type=_positive_int, nargs="+", default=[10, 20, 100, 200])
        k.add_argument("--temperature", type=_positive_float, default=0.07)
        k.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
        k.add_argument("--epochs", type=_positive_int, default=100)
        k.add_argument("--out", default="", help="also write the results as JSON here")
        k.set_defaults(func=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from dinov2.utils.config import ConfigError, one_line

    try:
        return int(args.func(args) or 0)
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        # Bad configs, unreadable or refused inputs (damaged/unsafe checkpoints, locked run folders)
        # and file-system failures (read-only, disk full) are the user's to fix: one line, exit 2.
        # DINOV2_TRACEBACK=1 shows the traceback for bug reports.
        if os.environ.get("DINOV2_TRACEBACK"):
            raise
        print(f"dinov2 {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
