"""``curate bootstrap-embedder``: a retrieval embedder for users without official DINOv2 weights.

Pretrains the tiny DINOv2 config (configs/train/tiny.yaml) for a few hundred steps
on the raw crawl itself, exports the teacher backbone in the official single-file
layout and prints the ``embedders:`` entry to paste into a curation config:

    curate bootstrap-embedder --inputs 'crawl/*.tar' --out runs/boot --steps 300

The same recipe the demo uses (demo/run.py).  Training runs as ``python -m dinov2.cli`` in a
child process: curation uses the trainer as a command, not as a library.  When to use what is in
docs/curation.md ("Choosing embedders"): official weights are far better for
retrieval; the bootstrapped backbone only knows the crawl it was trained on.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from dinov2.utils.config import ConfigError

from .ingest import expand_inputs

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny.yaml"


def add_parser(sub) -> None:
    p = sub.add_parser("bootstrap-embedder", help="pretrain a tiny DINOv2 retrieval embedder on the crawl")
    p.add_argument("--inputs", nargs="+", required=True, help="tar shards / patterns of the raw crawl")
    p.add_argument("--out", required=True, help="folder for the training run and backbone.pth")
    p.add_argument("--steps", type=int, default=300, help="training steps (CPU: ~1–2 s each)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--config", default=str(TINY), help="training config (default: configs/train/tiny.yaml)")
    p.add_argument("--name", default="dino", help="embedder name in the printed config snippet")


def overrides(run_dir: Path, patterns: list[str], steps: int, batch_size: int) -> list[str]:
    sources = ", ".join("{pattern: '%s'}" % p.replace("'", "''") for p in patterns)
    return [
        f"train.output_dir={run_dir}",
        f"data.sources=[{sources}]",
        f"data.batch_size={batch_size}",
        f"optim.max_steps={steps}",
        f"optim.epoch_length={max(10, steps // 6)}",
        f"checkpoint.every_n_steps={max(5, steps // 3)}",
        # On diverse photos the reference position init learns at once (bench/RESULTS.md, session 5).
        "model.pos_embed_init=trunc_normal",
    ]


def snippet(name: str, backbone: Path, image_size: int = 84) -> str:
    return (f"embedders:\n  {name}:\n    kind: dinov2\n    checkpoint: {backbone}\n"
            f"    pooling: cls_avgpool\n    image_size: {image_size}\nretrieve:\n  embedder: {name}\n")


def _dinov2(*args: str) -> int:
    return subprocess.run([sys.executable, "-m", "dinov2.cli", *args], check=False).returncode


def run(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.batch_size < 1:
        raise ConfigError("--steps and --batch-size must be >= 1")
    expand_inputs(list(args.inputs))  # a missing input fails here, before training starts
    out = Path(args.out).resolve()
    run_dir, backbone = out / "run", out / "backbone.pth"
    if not backbone.is_file():
        rc = _dinov2("train", "-c", args.config, *overrides(run_dir, list(args.inputs), args.steps, args.batch_size))
        if rc:
            return rc
        rc = _dinov2("export", str(run_dir), str(backbone))
        if rc:
            return rc
    print(f"[curate] retrieval embedder: {backbone}\n[curate] add to your curation config:\n"
          + snippet(args.name, backbone), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    ap = argparse.ArgumentParser(prog="python -m curation.bootstrap")
    add_parser(ap.add_subparsers(dest="command", required=True))
    sys.exit(run(ap.parse_args()))
