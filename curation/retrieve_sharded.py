"""Retrieval past one node: blocks of the pool streamed against the (small) query sets as job arrays.

Steps, each a submitit job or array on the configured executor:

1. ``search`` (array over blocks of whole embed shards; only with sample-based sets): every
   query's k best candidates within the block (:func:`curation.topk.block_topk`), queries × k rows.
2. ``train`` (one task; only with cluster-based sets): the k-means centroids from the same seeded
   sample of candidates as the gathered job (:func:`curation.kmeans.kmeans` on the whole pool).
3. ``assign`` (array over blocks): each candidate's k-means cluster.
4. ``reduce`` (one task): merges the per-block top-k lists (:func:`curation.topk.keep_topk`, ties →
   smaller pool row), assembles the labels, runs hierarchical k-means if enabled (still gathered:
   its resampling rounds re-assign the whole pool several times) and selects and writes with the
   gathered job's own code (:func:`curation.retrieve.select`, :func:`curation.retrieve.write_selection`).

Byte-identity with the gathered job: both compute sample-based similarities with the same GEMMs
(fixed chunks inside each shard, fixed query batches; curation/topk.py), so the similarities have
the same bits and the top-k under (similarity desc, row asc) is the same set, whatever the split.
That search is exact; an approximate ``retrieve.index.kind`` (whose lists depend on the split) is
refused here.  Assignment reads each shard in the gathered job's own chunks.  Every step skips the
work whose files exist, as long as the plan (pool, candidates, query sets) is unchanged.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from curation import jobs, layout
from curation.dedup_sharded import setup_task, task_usage
from curation.kmeans import assign, kmeans
from curation.retrieve import (Evidence, RetrieveConfig, candidate_mask, cluster_count, exact_search,
                               load_query_sets, select, set_plans, write_selection)
from curation.sharding import ShardingConfig, split_shards
from curation.store import EmbeddingStore, ShardedVectors, resolve_embedder
from curation.topk import block_topk, keep_topk
from dinov2.utils.config import ConfigError, to_dict
from dinov2.utils.io import atomic_save_npy, atomic_write_json, atomic_write_parquet


def _candidates_path(out_dir: str | Path) -> Path:
    return layout.retrieve_work(out_dir) / "candidates.npy"


def _centroids_path(out_dir: str | Path) -> Path:
    return layout.retrieve_work(out_dir) / "centroids.npy"


def make_plan(out_dir: str | Path, cfg: RetrieveConfig, sharding: ShardingConfig,
              n_tasks: int = 0) -> tuple[dict, np.ndarray]:
    """(plan, candidate mask): blocks of whole shards and the methods of the query sets."""
    embedder = resolve_embedder(out_dir, layout.POOL, cfg.embedder)
    store = EmbeddingStore(out_dir, layout.POOL, embedder)
    pool, mask = store.vectors, candidate_mask(out_dir, store.ids)
    blocks = split_shards([int(c) for c in pool.counts], n_tasks or sharding.num_blocks(pool.n))
    n_cand = int(mask.sum())
    _, plans = set_plans(load_query_sets(out_dir, embedder), cfg, n_cand)
    methods = {qs.name: [m, k] for qs, m, k, _ in plans}
    if any(m == "sample" for m, _ in methods.values()) and not exact_search(cfg):
        raise ConfigError(f"key 'retrieve.index.kind': the sharded retrieval searches exactly, but the config "
                          f"asks for '{cfg.index.kind}'; set it to auto or flat (the gathered job then matches)")
    plan = {"n": pool.n, "dim": pool.dim, "embedder": embedder, "paths": [str(p) for p in pool.paths],
            "counts": [int(c) for c in pool.counts], "blocks": [list(b) for b in blocks],
            "candidates": n_cand, "candidates_sha256": hashlib.sha256(np.packbits(mask).tobytes()).hexdigest(),
            "methods": methods, "config": to_dict(cfg)}
    return json.loads(json.dumps(plan, default=str)), mask  # the form plan.json holds (compared on resume)


def _block(plan: dict, block: int) -> tuple[ShardedVectors, int, int]:
    a, b = plan["blocks"][block]
    row0 = int(sum(plan["counts"][:a]))
    v = ShardedVectors(plan["paths"][a:b], plan["counts"][a:b], plan["dim"])
    return v, row0, row0 + v.n


# ----------------------------------------------------------------------------- map tasks (pure cores)
def search_core(out_dir: str | Path, plan: dict, block: int) -> pd.DataFrame:
    """Every sample-based query's k best candidates within one block: (set, query row, sim, row)."""
    vectors, lo, hi = _block(plan, block)
    mask = np.load(_candidates_path(out_dir))[lo:hi]
    frames = []
    for qs in load_query_sets(out_dir, plan["embedder"]):
        method, k = plan["methods"].get(qs.name, ["none", 0])
        if method != "sample" or qs.vectors.n == 0:
            continue
        q, s, r = block_topk(vectors, qs.vectors.load_all(), k, mask, row0=lo)
        frames.append(pd.DataFrame({"set": qs.name, "qrow": q, "sim": s, "row": r}))
    cols = {"set": pd.Series([], dtype=object), "qrow": np.zeros(0, np.int64), "sim": np.zeros(0, np.float32),
            "row": np.zeros(0, np.int64)}
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(cols)


def train_core(out_dir: str | Path, plan: dict, cfg: RetrieveConfig) -> np.ndarray:
    pool = ShardedVectors(plan["paths"], plan["counts"], plan["dim"])
    k, _ = cluster_count(cfg, plan["candidates"])
    return kmeans(pool, k, mask=np.load(_candidates_path(out_dir)), niter=cfg.kmeans_niter, seed=cfg.seed)


def assign_core(out_dir: str | Path, plan: dict, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(global candidate rows, k-means cluster) of one block."""
    vectors, lo, hi = _block(plan, block)
    rows, labels, _ = assign(vectors, np.load(_centroids_path(out_dir)), np.load(_candidates_path(out_dir))[lo:hi])
    return rows + lo, labels


def collect(out_dir: str | Path, plan: dict, cfg: RetrieveConfig, rows: np.ndarray) -> Evidence:
    """The map outputs as the gathered job's :class:`~curation.retrieve.Evidence`."""
    ev = Evidence()
    n_blocks = len(plan["blocks"])
    if any(m == "sample" for m, _ in plan["methods"].values()):
        hits = pd.concat([pd.read_parquet(layout.retrieve_part(out_dir, "hits", b)) for b in range(n_blocks)])
        for name, (method, k) in plan["methods"].items():
            if method == "sample":
                h = hits[hits["set"] == name]
                ev.hits[name] = keep_topk(h["qrow"].to_numpy(np.int64), h["sim"].to_numpy(np.float32),
                                          h["row"].to_numpy(np.int64), k)
    if any(m == "cluster" for m, _ in plan["methods"].values()):
        ev.centroids = np.load(_centroids_path(out_dir))
        _, ev.k_why = cluster_count(cfg, plan["candidates"])
        parts = [pd.read_parquet(layout.retrieve_part(out_dir, "labels", b)) for b in range(n_blocks)]
        got = np.concatenate([p["row"].to_numpy(np.int64) for p in parts])
        if not np.array_equal(got, rows):
            raise RuntimeError("the assign tasks do not cover the candidates once each: inconsistent work folder")
        ev.km_labels = np.concatenate([p["label"].to_numpy(np.int64) for p in parts])
    return ev


# ----------------------------------------------------------------------------- task bodies (job wrappers)
def task_search(out_dir: str, plan: dict, block: int, threads: int = 0) -> dict:
    setup_task(threads)
    path = layout.retrieve_part(out_dir, "hits", block)
    if not path.is_file():
        hits = search_core(out_dir, plan, block)
        atomic_write_parquet(path, pa.table({"set": pa.array(hits["set"].tolist(), pa.string()),
                                             "qrow": pa.array(hits["qrow"], pa.int64()),
                                             "sim": pa.array(hits["sim"], pa.float32()),
                                             "row": pa.array(hits["row"], pa.int64())}))
    return task_usage({"step": "search", "task": block})


def task_train(out_dir: str, plan: dict, cfg: RetrieveConfig, threads: int = 0) -> dict:
    setup_task(threads)
    if not _centroids_path(out_dir).is_file():
        atomic_save_npy(_centroids_path(out_dir), train_core(out_dir, plan, cfg))
    return task_usage({"step": "train"})


def task_assign(out_dir: str, plan: dict, block: int, threads: int = 0) -> dict:
    setup_task(threads)
    path = layout.retrieve_part(out_dir, "labels", block)
    if not path.is_file():
        rows, labels = assign_core(out_dir, plan, block)
        atomic_write_parquet(path, pa.table({"row": pa.array(rows, pa.int64()), "label": pa.array(labels, pa.int64())}))
    return task_usage({"step": "assign", "task": block})


def task_reduce(out_dir: str, plan: dict, cfg: RetrieveConfig, threads: int = 0) -> dict:
    setup_task(threads)
    if not layout.retrieve_selection(out_dir).is_file():
        from curation.hkmeans import hierarchical_kmeans

        store = EmbeddingStore(out_dir, layout.POOL, plan["embedder"])
        if store.n != plan["n"] or [str(p) for p in store.vectors.paths] != plan["paths"]:
            raise RuntimeError("the pool changed since the sharded retrieval's map tasks ran")
        mask = np.load(_candidates_path(out_dir))
        rows = np.flatnonzero(mask).astype(np.int64)
        ev = collect(out_dir, plan, cfg, rows) if len(rows) else Evidence()
        if cfg.hkmeans.enabled and len(rows):
            ev.hk = hierarchical_kmeans(store.vectors, cfg.hkmeans, mask)
        res = select(store.n, rows, load_query_sets(out_dir, plan["embedder"]), ev, cfg)
        write_selection(out_dir, store.ids, res, plan["embedder"])
    return task_usage({"step": "reduce"})


# ----------------------------------------------------------------------------- orchestration
def run_retrieve_sharded(out_dir: str | Path, cfg: RetrieveConfig, sharding: ShardingConfig,
                         executor: jobs.ExecutorConfig, *, progress: bool = True, n_tasks: int = 0) -> list[dict]:
    """Run the steps on ``executor``; returns every task's CPU time and peak RSS."""
    out_dir = str(out_dir)
    if layout.retrieve_selection(out_dir).is_file():
        return []  # done (the gathered job keeps an existing selection too)
    plan, mask = make_plan(out_dir, cfg, sharding, n_tasks)
    work = layout.retrieve_work(out_dir)
    if not ((work / "plan.json").is_file() and json.loads((work / "plan.json").read_text()) == plan):
        shutil.rmtree(work, ignore_errors=True)
        atomic_save_npy(_candidates_path(out_dir), mask)
        atomic_write_json(work / "plan.json", plan)  # last: the work folder is valid once this exists
    logs = Path(out_dir) / "logs" / "retrieve"
    n = len(plan["blocks"])
    threads = jobs.local_threads(executor, n)
    methods = {m for m, _ in plan["methods"].values()}
    usage: list[dict] = []

    def step(name: str, fn, calls: list[tuple], gather: bool = False) -> None:
        usage.extend(jobs.run_tasks(executor, logs / name, f"retrieve-{name}", fn, calls,
                                    [f"retrieve {name} task {i}/{len(calls)}" for i in range(len(calls))],
                                    gather=gather, progress=progress))

    if plan["candidates"] and "sample" in methods:
        step("search", task_search, [(out_dir, plan, b, threads) for b in range(n)])
    if plan["candidates"] and "cluster" in methods:
        step("train", task_train, [(out_dir, plan, cfg, 0)])
        step("assign", task_assign, [(out_dir, plan, b, threads) for b in range(n)])
    step("reduce", task_reduce, [(out_dir, plan, cfg, 0)], gather=True)
    shutil.rmtree(work, ignore_errors=True)
    return usage
