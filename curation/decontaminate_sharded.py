"""Decontamination past one node: the pool streamed against the (small) eval index as a job array.

``match`` tasks (an array over blocks of whole pool embed shards) each build the eval index — the
same deterministic build as the gathered job — and write every row's best eval match; one
``reduce`` task collects them, spreads contamination over dedup components and writes the
decisions with the gathered stage's code (:func:`run_decontaminate`).  A block is searched in the
gathered job's own per-shard batches, so the decisions are byte-identical.  Map outputs that
exist are kept (a killed run resumes) as long as the plan is unchanged.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from curation import jobs, layout
from curation.decontaminate import DecontamConfig, best_matches, run_decontaminate
from curation.dedup_sharded import plan_whitener, setup_task, task_usage, task_whiten
from curation.sharding import ShardingConfig, split_shards
from curation.store import EmbeddingStore, ShardedVectors, list_sources, resolve_embedder
from curation.whiten import pool_whitener
from dinov2.utils.io import atomic_write_json, atomic_write_parquet


def make_plan(out_dir: str | Path, cfg: DecontamConfig, sharding: ShardingConfig, n_tasks: int = 0) -> dict:
    embedder = resolve_embedder(out_dir, layout.POOL, cfg.embedder)
    whitener = pool_whitener(out_dir, embedder, cfg.whitening)
    pool = EmbeddingStore(out_dir, layout.POOL, embedder, whitener).vectors
    blocks = split_shards([int(c) for c in pool.counts], n_tasks or sharding.num_blocks(pool.n))
    return {"n": pool.n, "dim": pool.dim, "raw_dim": pool.raw_dim, "embedder": embedder,
            "whitening": str(whitener.path) if whitener is not None else None, "evals": list_sources(out_dir, layout.EVAL_PREFIX),
            "paths": [str(p) for p in pool.paths], "counts": [int(c) for c in pool.counts],
            "blocks": [list(b) for b in blocks]}


def match_core(out_dir: str | Path, plan: dict, cfg: DecontamConfig, block: int):
    """(global rows, best eval row, cosine) of one block of the pool."""
    a, b = plan["blocks"][block]
    row0 = int(sum(plan["counts"][:a]))
    whitener = plan_whitener(plan)
    vectors = ShardedVectors(plan["paths"][a:b], plan["counts"][a:b], plan["raw_dim"], whitener)
    evals = EmbeddingStore(out_dir, plan["evals"], plan["embedder"], whitener).vectors
    best_row, best_sim = best_matches(vectors, evals, cfg)
    return np.arange(vectors.n, dtype=np.int64) + row0, best_row, best_sim


def task_match(out_dir: str, plan: dict, cfg: DecontamConfig, block: int, threads: int = 0) -> dict:
    setup_task(threads)
    path = layout.decontaminate_matches(out_dir, block)
    if not path.is_file():
        rows, best_row, best_sim = match_core(out_dir, plan, cfg, block)
        atomic_write_parquet(path, pa.table({"row": pa.array(rows, pa.int64()),
                                             "eval_row": pa.array(best_row, pa.int64()),
                                             "eval_sim": pa.array(best_sim, pa.float32())}))
    return task_usage({"step": "match", "task": block})


def reduce_matches(out_dir: str | Path, plan: dict) -> tuple[np.ndarray, np.ndarray]:
    n = plan["n"]
    best_row = np.full(n, -1, np.int64)
    best_sim = np.full(n, np.nan, np.float32)
    seen = np.zeros(n, bool)
    for block in range(len(plan["blocks"])):
        m = pd.read_parquet(layout.decontaminate_matches(out_dir, block))
        rows = m["row"].to_numpy(np.int64)
        if seen[rows].any():
            raise RuntimeError(f"match task {block} covers rows another task covered: inconsistent work folder")
        seen[rows] = True
        best_row[rows], best_sim[rows] = m["eval_row"].to_numpy(np.int64), m["eval_sim"].to_numpy(np.float32)
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} pool rows were matched by no task")
    return best_row, best_sim


def task_reduce(out_dir: str, plan: dict, cfg: DecontamConfig, threads: int = 0) -> dict:
    setup_task(threads)

    def matches(pool: EmbeddingStore):
        if pool.n != plan["n"] or [str(p) for p in pool.vectors.paths] != plan["paths"]:
            raise RuntimeError("the pool changed since the sharded decontamination's match tasks ran")
        return reduce_matches(out_dir, plan)

    run_decontaminate(out_dir, cfg, matches_fn=matches)
    return task_usage({"step": "reduce"})


def run_decontaminate_sharded(out_dir: str | Path, cfg: DecontamConfig, sharding: ShardingConfig,
                              executor: jobs.ExecutorConfig, *, progress: bool = True, n_tasks: int = 0) -> list[dict]:
    out_dir = str(out_dir)
    logs = Path(out_dir) / "logs" / "decontaminate"
    usage: list[dict] = []
    if cfg.whitening.kind != "none":  # fitted (or found) in a job, as the sharded dedup does
        usage += jobs.run_tasks(executor, logs / "whiten", "decontaminate-whiten", task_whiten,
                                [(out_dir, resolve_embedder(out_dir, layout.POOL, cfg.embedder), cfg.whitening)],
                                ["decontaminate whiten"], gather=True, progress=progress)
    plan = make_plan(out_dir, cfg, sharding, n_tasks)
    work = layout.decontaminate_work(out_dir)
    if not ((work / "plan.json").is_file() and json.loads((work / "plan.json").read_text()) == plan):
        shutil.rmtree(work, ignore_errors=True)
        atomic_write_json(work / "plan.json", plan)
    n = len(plan["blocks"])
    threads = jobs.local_threads(executor, n)
    usage += jobs.run_tasks(executor, logs / "match", "decontaminate-match", task_match,
                           [(out_dir, plan, cfg, b, threads) for b in range(n)],
                           [f"decontaminate match task {b}/{n}" for b in range(n)], progress=progress)
    usage += jobs.run_tasks(executor, logs / "reduce", "decontaminate-reduce", task_reduce, [(out_dir, plan, cfg, 0)],
                            ["decontaminate reduce"], gather=True, progress=progress)
    shutil.rmtree(work, ignore_errors=True)
    return usage
