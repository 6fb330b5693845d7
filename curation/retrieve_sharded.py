"""Retrieval past one node: blocks of the pool streamed against the (small) query sets as job arrays.

Steps, each a submitit job or array on the configured executor:

1. ``search`` (array over blocks of whole embed shards; only with sample-based sets): every
   query's k best candidates within the block (:func:`curation.topk.block_topk`), queries × k rows.
2. ``train`` (one task; only with cluster-based sets): the k-means centroids from the same seeded
   sample of candidates as the gathered job (:func:`curation.kmeans.kmeans` on the whole pool).
3. ``assign`` (array over blocks): each candidate's k-means cluster.
4. ``hk-train-r`` / ``hk-assign-r`` (hierarchical k-means enabled): the finest level as the gathered
   job computes it, round r = 0 the seeded k-means, then each resampling round one task re-fitting
   the centroids on the points closest to each (from every candidate's label and cosine) and one
   assign array.  The coarser levels cluster centroids only and run in the reduce.
5. ``reduce`` (one task): merges the per-block top-k lists (:func:`curation.topk.keep_topk`, ties →
   smaller pool row), assembles the labels and selects and writes with the gathered job's own code
   (:func:`curation.retrieve.select`, :func:`curation.retrieve.write_selection`).

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
from curation.hkmeans import first_centroids, hierarchical_kmeans, level_sizes, resampled_centroids
from curation.kmeans import assign, kmeans
from curation.retrieve import (
    Evidence,
    RetrieveConfig,
    candidate_mask,
    cluster_count,
    exact_search,
    load_query_sets,
    select,
    set_plans,
    write_selection,
)
from curation.sharding import ShardingConfig, split_shards
from curation.store import EmbeddingStore, ShardedVectors, resolve_embedder
from curation.topk import block_topk, keep_topk
from dinov2.utils.config import ConfigError, to_dict
from dinov2.utils.io import atomic_save_npy, atomic_write_json, atomic_write_parquet


def _candidates_path(out_dir: str | Path) -> Path:
    return layout.retrieve_work(out_dir) / "candidates.npy"


def _centroids_path(out_dir: str | Path) -> Path:
    return layout.retrieve_work(out_dir) / "centroids.npy"


def _hk_centroids_path(out_dir: str | Path, r: int) -> Path:
    return layout.retrieve_work(out_dir) / f"hk-centroids-{r}.npy"


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


def assign_core(out_dir: str | Path, plan: dict, block: int, centroids: Path):
    """(global candidate rows, nearest centroid, cosine) of one block."""
    vectors, lo, hi = _block(plan, block)
    rows, labels, sims = assign(vectors, np.load(centroids), np.load(_candidates_path(out_dir))[lo:hi])
    return rows + lo, labels, sims


def read_labels(out_dir: str | Path, plan: dict, part: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, cosines) of every candidate from the assign tasks' ``part`` files, in row order."""
    parts = [pd.read_parquet(layout.retrieve_part(out_dir, part, b)) for b in range(len(plan["blocks"]))]
    got = np.concatenate([p["row"].to_numpy(np.int64) for p in parts])
    if not np.array_equal(got, rows):
        raise RuntimeError("the assign tasks do not cover the candidates once each: inconsistent work folder")
    return (np.concatenate([p["label"].to_numpy(np.int64) for p in parts]),
            np.concatenate([p["sim"].to_numpy(np.float32) for p in parts]))


def hk_rounds_done(out_dir: str | Path, cfg: RetrieveConfig) -> int:
    """The last level-0 round whose centroids exist (rounds stop early when too few points remain)."""
    r = 0
    while r < cfg.hkmeans.resampling_rounds and _hk_centroids_path(out_dir, r + 1).is_file():
        r += 1
    return r


def hk_train_core(out_dir: str | Path, plan: dict, cfg: RetrieveConfig, r: int) -> np.ndarray | None:
    """Level-0 centroids of hierarchical k-means, round ``r`` (0: the seeded k-means; then resampling)."""
    hk = cfg.hkmeans
    pool = ShardedVectors(plan["paths"], plan["counts"], plan["dim"])
    mask = np.load(_candidates_path(out_dir))
    if r == 0:
        return first_centroids(pool, min(level_sizes(hk, plan["candidates"])[0], plan["candidates"]), hk, hk.seed, mask)
    rows = np.flatnonzero(mask).astype(np.int64)
    labels, sims = read_labels(out_dir, plan, f"hk{r - 1}", rows)
    return resampled_centroids(pool, rows, labels, sims, np.load(_hk_centroids_path(out_dir, r - 1)), hk, hk.seed, r - 1)


def collect(out_dir: str | Path, plan: dict, cfg: RetrieveConfig, rows: np.ndarray) -> Evidence:
    """The map outputs as the gathered job's :class:`~curation.retrieve.Evidence`."""
    ev = Evidence()
    n_blocks = len(plan["blocks"])
    sample = {name: k for name, (method, k) in plan["methods"].items() if method == "sample"}
    if sample:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
        ev.hits = {name: empty for name in sample}
        for b in range(n_blocks):  # a running merge: never more than two blocks' hits in memory
            hits = pd.read_parquet(layout.retrieve_part(out_dir, "hits", b))
            for name, h in hits.groupby("set", sort=False):
                got = (h["qrow"].to_numpy(np.int64), h["sim"].to_numpy(np.float32), h["row"].to_numpy(np.int64))
                ev.hits[name] = keep_topk(*(np.concatenate(p) for p in zip(ev.hits[name], got)), sample[name])
    if any(m == "cluster" for m, _ in plan["methods"].values()):
        ev.centroids = np.load(_centroids_path(out_dir))
        _, ev.k_why = cluster_count(cfg, plan["candidates"])
        ev.km_labels = read_labels(out_dir, plan, "labels", rows)[0]
    if cfg.hkmeans.enabled:
        r = hk_rounds_done(out_dir, cfg)
        level0 = (rows, read_labels(out_dir, plan, f"hk{r}", rows)[0], np.load(_hk_centroids_path(out_dir, r)))
        store = ShardedVectors(plan["paths"], plan["counts"], plan["dim"])
        ev.hk = hierarchical_kmeans(store, cfg.hkmeans, np.load(_candidates_path(out_dir)), level0=level0)
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


def task_assign(out_dir: str, plan: dict, block: int, part: str, centroids: str, threads: int = 0) -> dict:
    setup_task(threads)
    path = layout.retrieve_part(out_dir, part, block)
    if not path.is_file():
        rows, labels, sims = assign_core(out_dir, plan, block, Path(centroids))
        atomic_write_parquet(path, pa.table({"row": pa.array(rows, pa.int64()), "label": pa.array(labels, pa.int64()),
                                             "sim": pa.array(sims, pa.float32())}))
    return task_usage({"step": "assign", "task": block, "part": part})


def task_hk_train(out_dir: str, plan: dict, cfg: RetrieveConfig, r: int, threads: int = 0) -> dict:
    setup_task(threads)
    path, stop = _hk_centroids_path(out_dir, r), layout.retrieve_work(out_dir) / "hk-stop.json"
    if not path.is_file() and not stop.is_file():
        centroids = hk_train_core(out_dir, plan, cfg, r)
        if centroids is None:
            atomic_write_json(stop, {"round": r})  # too few points: the rounds stop, as in the gathered job
        else:
            atomic_save_npy(path, centroids)
    return task_usage({"step": "hk-train", "task": r})


def task_reduce(out_dir: str, plan: dict, cfg: RetrieveConfig, threads: int = 0) -> dict:
    setup_task(threads)
    if not layout.retrieve_selection(out_dir).is_file():
        store = EmbeddingStore(out_dir, layout.POOL, plan["embedder"])
        if store.n != plan["n"] or [str(p) for p in store.vectors.paths] != plan["paths"]:
            raise RuntimeError("the pool changed since the sharded retrieval's map tasks ran")
        mask = np.load(_candidates_path(out_dir))
        rows = np.flatnonzero(mask).astype(np.int64)
        ev = collect(out_dir, plan, cfg, rows) if len(rows) else Evidence()
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
        step("assign", task_assign, [(out_dir, plan, b, "labels", str(_centroids_path(out_dir)), threads)
                                     for b in range(n)])
    for r in range(cfg.hkmeans.resampling_rounds + 1) if plan["candidates"] and cfg.hkmeans.enabled else ():
        step(f"hk-train-{r}", task_hk_train, [(out_dir, plan, cfg, r)])
        if not _hk_centroids_path(out_dir, r).is_file():
            break  # the resampling rounds stopped early
        c = str(_hk_centroids_path(out_dir, r))
        step(f"hk-assign-{r}", task_assign, [(out_dir, plan, b, f"hk{r}", c, threads) for b in range(n)])
    step("reduce", task_reduce, [(out_dir, plan, cfg, 0)], gather=True)
    shutil.rmtree(work, ignore_errors=True)
    return usage
