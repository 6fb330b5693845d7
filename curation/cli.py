"""`curate` command line.

    curate run           -c configs/curation/demo.yaml [key=value …]   all stages, then audit
    curate embed         -c CONFIG [key=value …]                         one stage
    curate dedup | decontaminate | retrieve | write   -c CONFIG [key=value …]
    curate audit OUT                                                     verify a finished output folder
    curate audit -c CONFIG [key=value …]
    curate bootstrap-embedder --inputs 'crawl/*.tar' --out DIR [--steps N]   retrieval embedder (docs/curation.md)

Exit status: 0 success, 1 a stage or the audit failed, 2 a configuration/input error, a folder in
use by another run, or a file-system error (one line on stderr; ``CURATE_TRACEBACK=1`` shows the
traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

STAGE_COMMANDS = ("embed", "dedup", "decontaminate", "retrieve", "write")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curate", description="DINOv2-style data curation pipeline")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", *STAGE_COMMANDS):
        sp = sub.add_parser(name, help="all stages + audit" if name == "run" else f"the {name} stage")
        sp.add_argument("-c", "--config", required=True, help="YAML config (configs/curation/*.yaml)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. executor.cluster=slurm")
        sp.add_argument("--no-progress", action="store_true", help="disable tqdm progress bars")
        if name == "run":
            sp.add_argument("--no-audit", action="store_true", help="skip the final audit")
    sp = sub.add_parser("audit", help="verify shards, manifest and inputs of an output folder")
    sp.add_argument("out_dir", nargs="?", help="output folder of a finished run")
    sp.add_argument("-c", "--config", help="config instead of OUT (uses its output_dir and inputs)")
    sp.add_argument("overrides", nargs="*", default=[], help="key=value overrides (with -c)")
    sp.add_argument("--no-decode", action="store_true", help="skip decoding every image")
    from .bootstrap import add_parser as add_bootstrap

    add_bootstrap(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from dinov2.utils.config import ConfigError, one_line
    from dinov2.utils.lock import FolderLocked

    from .ingest import InputError
    from .jobs import StageFailed
    from .write import WriteError

    try:
        if args.command == "audit":
            return _audit(args)
        if args.command == "bootstrap-embedder":
            from .bootstrap import run as bootstrap

            return bootstrap(args)
        from .config import load_curation_config
        from .pipeline import prepare_output, run_pipeline, run_stage

        cfg = load_curation_config(args.config, args.overrides)
        if args.command == "run":
            summary = run_pipeline(cfg, audit=not args.no_audit, progress=not args.no_progress)
            return 0 if summary.get("audit_ok", True) else 1
        with prepare_output(cfg):
            run_stage(cfg, args.command, progress=not args.no_progress)
        if args.command == "write":
            import json

            from . import layout
            from .funnel import format_funnel

            summary = json.loads(layout.summary(cfg.output_dir).read_text())
            print("[curate] funnel:\n" + format_funnel(summary["funnel"]), flush=True)
        return 0
    except (StageFailed, WriteError) as exc:
        print(f"curate: failed: {one_line(exc)}", file=sys.stderr)
        return 1
    except (ConfigError, InputError, FolderLocked, OSError, ValueError) as exc:
        # Also file-system failures (read-only folder, disk full): the user's to fix, one line.
        if os.environ.get("CURATE_TRACEBACK"):
            raise
        print(f"curate: error: {one_line(exc)}", file=sys.stderr)
        return 2


def _audit(args: argparse.Namespace) -> int:
    from .audit import audit

    inputs = None
    if args.config:
        from .config import load_curation_config

        cfg = load_curation_config(args.config, args.overrides)
        out_dir, inputs = cfg.output_dir, list(cfg.inputs)
    elif args.out_dir:
        out_dir = args.out_dir
    else:
        print("curate audit: give an output folder or -c CONFIG", file=sys.stderr)
        return 2
    if not Path(out_dir).is_dir():
        print(f"curate audit: no such output folder: {out_dir}", file=sys.stderr)
        return 2
    report = audit(out_dir, inputs=inputs, decode=not args.no_decode)
    print(report.text(), end="")
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
