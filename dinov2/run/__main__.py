"""Helpers for ``slurm/train.sbatch``: ``python -m dinov2.run run-dir CONFIG [overrides]`` and
``python -m dinov2.run dist-env``."""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from dinov2.run.slurm_env import torch_dist_env
from dinov2.train.config import load_train_config
from dinov2.utils.config import ConfigError


def _cmd_run_dir(args: Sequence[str]) -> int:
    """``python -m dinov2.run run-dir CONFIG [overrides]``: validate the config and print its
    train.output_dir (absolute), so the sbatch script fails early on a bad config."""
    if not args:
        print("usage: python -m dinov2.run run-dir CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        cfg = load_train_config(args[0], list(args[1:]))
    except (ConfigError, OSError) as exc:
        print(f"invalid training config {args[0]}: {exc}", file=sys.stderr)
        return 2
    print(Path(cfg.train.output_dir).expanduser().resolve())
    return 0


def _cmd_dist_env(args: Sequence[str]) -> int:
    """``python -m dinov2.run dist-env``: print torch.distributed exports for this task."""
    try:
        env = torch_dist_env()
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"run-dir": _cmd_run_dir, "dist-env": _cmd_dist_env}
    if not argv or argv[0] not in commands:
        print(f"usage: python -m dinov2.run {{{'|'.join(commands)}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
