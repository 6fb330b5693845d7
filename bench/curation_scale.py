"""Benchmark: the sharded dedup (map → reduce job arrays) against the gathered job, same pool.

Pool: curation.synth_vectors (clustered float16 vectors with planted near-duplicate pairs),
written as an embed-stage folder of ``--blocks`` shards.  Both paths run on the submitit local
executor (each task its own process), with the dedup stage's default config and threshold 0.6 (k=64,
ivf_gemm above 1e5 rows).  Prints per step: tasks, wall s, CPU s (sum over tasks), max peak RSS
of a task; then the checks: decisions byte-identical, planted-pair recall, RSS and CPU ratios.
``--no-gathered`` runs only the sharded path (pools too big for one job on this machine).

    .venv/bin/python bench/curation_scale.py --n 1000000 --dim 384 --blocks 8
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation import jobs, layout
from curation.choices import Sharding
from curation.dedup import DedupConfig
from curation.dedup_sharded import run_dedup_sharded, task_baseline, task_gathered
from curation.index_plan import IndexConfig, plan_index
from curation.sharding import ShardingConfig
from curation.synth_vectors import make_shards
from dinov2.utils.io import atomic_write_parquet

EMB = "bench"


def write_pool(out: Path, n: int, dim: int, blocks: int, seed: int = 0) -> np.ndarray:
    """An embed-stage folder (ids + float16 vectors) of ``blocks`` shards; returns the planted pairs."""
    folder = layout.embed_dir(out, "pool")
    folder.mkdir(parents=True)
    rows = -(-n // blocks)
    paths, pairs = make_shards(n, folder, seed, dim=dim, shard_rows=rows, name="s{:06d}." + EMB + ".npy")
    for i, p in enumerate(paths):
        m = len(np.load(p, mmap_mode="r"))
        atomic_write_parquet(layout.embed_parquet(out, "pool", layout.shard_id(i)), pd.DataFrame({
            "id": [f"pool/{i}/{j}" for j in range(m)], "status": "ok", "emb_row": np.arange(m)}))
    return pairs


def pair_recall(out: Path, pairs: np.ndarray) -> float:
    comp = pd.read_parquet(layout.dedup_decisions(out), columns=["component"])["component"].to_numpy()
    return float((comp[pairs[:, 0]] == comp[pairs[:, 1]]).mean())


def summarise(name: str, usage: list[dict], wall: float) -> dict:
    return {"path": name, "tasks": len(usage), "wall_s": wall, "cpu_s": sum(u["cpu_s"] for u in usage),
            "peak_rss_gb": max(u["peak_rss_gb"] for u in usage),
            "read_gb": sum(u.get("bytes_read", 0) for u in usage) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--no-gathered", action="store_true", help="sharded path only")
    ap.add_argument("--tmp", default=None, help="folder for the pools (default: the system temp folder)")
    ap.add_argument("--parallel", type=int, default=256,
                    help="executor.array_parallelism: tasks of an array running at once (default: all)")
    ap.add_argument("--query-batch", type=int, default=0,
                    help="index.gemm_query_batch: queries per pass over the lists (reads ~ N / batch × pieces; "
                         "default 0 = auto)")
    args = ap.parse_args()
    # the synthetic pool's planted pairs sit above 0.6
    cfg = DedupConfig(embedder=EMB, threshold=0.6, index=IndexConfig(gemm_query_batch=args.query_batch))
    ex = jobs.ExecutorConfig(cluster="local", poll_interval_s=2.0, array_parallelism=args.parallel)
    batch = plan_index(args.n, args.dim, dataclasses.replace(cfg.index, kind="ivf_gemm")).query_batch
    print(f"n {args.n:,} x {args.dim}, {args.blocks} blocks, {args.parallel} at once, query batch "
          f"{batch:,}, {os.cpu_count()} CPUs, "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        root = Path(tmp)
        t0 = time.time()
        pairs = write_pool(root / "sharded", args.n, args.dim, args.blocks)
        print(f"pool written in {time.time() - t0:.0f} s ({len(pairs):,} planted pairs)", flush=True)
        rows = []
        floor = jobs.run_tasks(ex, root / "baseline", "baseline", task_baseline, [(0,)], progress=False)[0]
        print(f"per-process floor (python + numpy + faiss + the curation modules a search task loads, nothing computed): "
              f"{floor['peak_rss_gb']:.2f} GB peak RSS", flush=True)
        if not args.no_gathered:
            shutil.copytree(root / "sharded" / "embed", root / "gathered" / "embed")
            t0 = time.time()
            usage = jobs.run_tasks(ex, root / "gathered" / "logs", "gathered", task_gathered,
                                   [(str(root / "gathered"), cfg, 0)], progress=False)
            rows.append(summarise("gathered", usage, time.time() - t0))
            print(f"gathered done, load average {os.getloadavg()[0]:.2f}", flush=True)
        t0 = time.time()
        usage = run_dedup_sharded(root / "sharded", cfg, ShardingConfig(mode=Sharding.sharded), ex,
                                  progress=False, n_tasks=args.blocks)
        wall = time.time() - t0
        rows.append(summarise("sharded", usage, wall))
        for step in ("train", "assign", "search", "reduce"):
            part = [u for u in usage if u["step"] == step]
            if part:
                rows.append(summarise(f"  {step}", part, float("nan")))
        print(f"sharded done, load average {os.getloadavg()[0]:.2f}", flush=True)
        print("\n| path | tasks | wall s | CPU s | peak RSS/task GB | pieces read GB | CPU ratio | RSS ratio |")
        print("|---|---|---|---|---|---|---|---|")
        base = rows[0] if not args.no_gathered else None
        for r in rows:
            ratio = (f"{r['cpu_s'] / base['cpu_s']:.2f} | {r['peak_rss_gb'] / base['peak_rss_gb']:.2f}"
                     if base else "– | –")
            wall_txt = "–" if r["wall_s"] != r["wall_s"] else f"{r['wall_s']:.0f}"
            print(f"| {r['path']} | {r['tasks']} | {wall_txt} | {r['cpu_s']:.0f} | {r['peak_rss_gb']:.2f} | "
                  f"{r['read_gb']:.2f} | {ratio} |")
        if base:
            above = [r for r in rows if r["path"] in ("gathered", "  search")]
            print("above the per-process floor: " + ", ".join(
                f"{r['path'].strip()} {r['peak_rss_gb'] - floor['peak_rss_gb']:.2f} GB" for r in above))
        print(f"\nplanted-pair recall (sharded): {pair_recall(root / 'sharded', pairs):.4f}")
        if base:
            same = (layout.dedup_decisions(root / "sharded").read_bytes()
                    == layout.dedup_decisions(root / "gathered").read_bytes())
            print(f"decisions byte-identical to gathered: {same}")
        # The gathered job holds the list-ordered pool in float32 plus probes and sort arrays (gemm_ivf.py).
        need = floor["peak_rss_gb"] + args.n * (4 * args.dim + 4 * 16 + 24) / 2**30
        print(f"gathered job's memory for this pool, at least: {need:.2f} GB (floor + n x (4 D + 4 nprobe + 24) B)")
        pieces = args.n * (2 * args.dim + 8 + 4 * 16) / 2**30
        print(f"pieces written by assign (n x (2 D + 8 + 4 nprobe) B): {pieces:.2f} GB")
        d = pd.read_parquet(layout.dedup_decisions(root / "sharded"), columns=["kept", "component"])
        print(f"kept {int(d['kept'].sum()):,} of {len(d):,}; components {d['component'].nunique():,}; "
              f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
