"""The dedup stage past one node: the embedding k-NN graph as map → reduce over job arrays.

Steps, each a submitit job or array on the configured executor (local processes or SLURM):

1. ``train`` (one task, ivf_gemm only): the IVF centroids from the same seeded sample as the
   gathered index build (:func:`curation.gemm_ivf.train_centroids`).
2. ``assign`` (array over blocks of whole embed shards): each row's probed lists; the block's rows
   written in list order (:mod:`curation.ivf_pieces`).
3. ``search`` (array over ranges of the list-ordered pool that start at ``index.gemm_query_batch``
   boundaries): the gathered self-search's own batches, reading the lists they probe from the
   pieces; a task keeps its above-threshold edges, reduces them to a spanning forest, and writes
   that plus each queried row's nearest neighbour.  Flat pools (below ``index.flat_max``) search
   blocks of whole shards against a flat index of the pool, in the gathered job's batches.
4. ``reduce`` (one task): streams the forests into one union-find (never all edges at once), adds
   the hash edges and writes the decisions with the gathered stage's own code (:func:`run_dedup`).

Because every GEMM sees the same operands as in the gathered job, the decisions are
byte-identical.  Every step skips the work whose files exist, so a killed run resumes.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from curation import jobs, layout
from curation.choices import IndexKind
from curation.components import spanning_forest, union_edges
from curation.dedup import DedupConfig, KnnGraph, graph_of_batches, run_dedup
from curation.index_plan import plan_index
from curation.sharding import ShardingConfig, split_range, split_shards
from curation.store import EmbeddingStore, ShardedVectors, resolve_embedder
from curation.whiten import pool_whitener
from dinov2.utils.config import ConfigError
from dinov2.utils.io import atomic_save_npy, atomic_write_json, atomic_write_parquet

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- plan
def make_plan(vectors: ShardedVectors, cfg: DedupConfig, sharding: ShardingConfig, n_tasks: int = 0) -> dict:
    """Index plan, assign blocks and search ranges of a pool (pure; JSON-serialisable)."""
    plan = _plan_index(vectors.n, vectors.dim, cfg)
    if plan.kind not in ("flat", "ivf_gemm"):
        raise ConfigError(
            f"key 'dedup.index.kind': the sharded dedup scans flat or ivf_gemm lists, but this pool plans "
            f"'{plan.kind}'; set dedup.index.kind: ivf_gemm (the gathered job then builds the same index)")
    n_blocks = n_tasks or sharding.num_blocks(vectors.n)
    blocks = split_shards([int(c) for c in vectors.counts], n_blocks)
    if plan.kind == "flat":
        ranges = [(int(vectors.offsets[a]), int(vectors.offsets[b])) for a, b in blocks]
    else:
        ranges = split_range(vectors.n, plan.query_batch, n_blocks)
    whitening = getattr(vectors.transform, "path", None)
    return {"n": vectors.n, "dim": vectors.dim, "raw_dim": vectors.raw_dim, "kind": plan.kind, "nlist": plan.nlist,
            "whitening": str(whitening) if whitening is not None else None,
            "paths": [str(p) for p in vectors.paths], "counts": [int(c) for c in vectors.counts],
            "blocks": [list(b) for b in blocks], "ranges": [list(r) for r in ranges]}


def plan_whitener(plan: dict):
    """The pool's whitening the plan was made with (None: raw cosines)."""
    from curation.whiten import Whitener

    return Whitener.load(plan["whitening"]) if plan.get("whitening") else None


def _vectors(plan: dict, shards: tuple[int, int] | None = None) -> ShardedVectors:
    a, b = shards or (0, len(plan["paths"]))
    return ShardedVectors(plan["paths"][a:b], plan["counts"][a:b], plan["raw_dim"], plan_whitener(plan))


def _plan_index(n: int, dim: int, cfg: DedupConfig):
    """The index every sharded step uses (plan, train, assign, search: one rule, or they disagree on
    nlist and batches).  ``auto`` never turns into IVF-PQ here: its float32 cap
    (``index.max_memory_gb``) is about one process holding the whole pool, and a sharded task holds
    one block.  Without this the pools the sharding exists for (a 1e7 × 256 pool is 10 GB of
    float32) were refused under the default config."""
    index_cfg = cfg.index
    if index_cfg.kind == IndexKind.auto:
        index_cfg = dataclasses.replace(index_cfg, max_memory_gb=math.inf)
    return plan_index(n, dim, index_cfg, gpu=False)


def _index_plan(plan: dict, cfg: DedupConfig):
    return _plan_index(plan["n"], plan["dim"], cfg)


# ----------------------------------------------------------------------------- map tasks (pure cores)
def train_core(plan: dict, cfg: DedupConfig) -> np.ndarray:
    from curation.gemm_ivf import train_centroids

    return train_centroids(_vectors(plan), np.arange(plan["n"], dtype=np.int64), _index_plan(plan, cfg), cfg.index)


def search_core(out_dir: str | Path, plan: dict, cfg: DedupConfig, task: int) -> tuple[KnnGraph, int]:
    """One search task's thresholded graph (``compact``: nearest neighbours of its own rows only) and
    the bytes it read from the pieces."""
    vectors = _vectors(plan)
    start, stop = plan["ranges"][task]
    kw = {"max_k": cfg.max_k, "pq_rescore_margin": cfg.pq_rescore_margin, "compact": True}
    if plan["kind"] == "flat":
        from curation.index import build_index

        index = build_index(vectors, cfg.index)
        mask = np.zeros(plan["n"], bool)  # a flat pool is small by definition (< index.flat_max)
        mask[start:stop] = True
        batches = ((q, *index.search(x, cfg.k + 1)) for q, x in vectors.iter_blocks(cfg.index.search_batch, mask))
        return graph_of_batches(index, batches, vectors, cfg.k, cfg.threshold, **kw), 0
    from curation.gemm_ivf import GemmIvfIndex
    from curation.ivf_pieces import DiskLists

    lists = DiskLists(out_dir, len(plan["blocks"]), prepared=vectors.transform is not None)
    try:
        index = GemmIvfIndex(np.load(layout.dedup_centroids(out_dir)), lists, lists.bounds,
                             _index_plan(plan, cfg), cfg.index, None, None)
        g = graph_of_batches(index, index.search_sorted(start, stop, cfg.k + 1), vectors, cfg.k,
                             cfg.threshold, **kw)
        return g, lists.bytes_read
    finally:
        lists.close()


def reduce_graph(out_dir: str | Path, plan: dict) -> KnnGraph:
    """The pool's graph from the search tasks' outputs: their forests streamed into one union-find."""
    n = plan["n"]
    parent = np.arange(n, dtype=np.int64)
    nn_row = np.full(n, -1, np.int64)
    nn_sim = np.full(n, np.nan, np.float32)
    seen = np.zeros(n, bool)
    edges = requeried = 0
    for t in range(len(plan["ranges"])):
        forest = np.load(layout.dedup_edges(out_dir, t, "forest.npy"))
        union_edges(parent, forest[:, 0], forest[:, 1])
        nn = pd.read_parquet(layout.dedup_edges(out_dir, t, "nn.parquet"))
        q = nn["row"].to_numpy(np.int64)
        if seen[q].any():
            raise RuntimeError(f"search task {t} queried rows another task queried: inconsistent work folder")
        seen[q] = True
        nn_row[q], nn_sim[q] = nn["nn_row"].to_numpy(np.int64), nn["nn_sim"].to_numpy(np.float32)
        done = json.loads(layout.dedup_edges(out_dir, t, "done.json").read_text())
        edges += done["edges"]
        requeried += done["requeried"]
    if not seen.all():
        raise RuntimeError(f"{int((~seen).sum())} pool rows were queried by no search task")
    child = parent != np.arange(n)
    return KnnGraph(np.flatnonzero(child), parent[child], np.zeros(int(child.sum()), np.float32), nn_row, nn_sim,
                    requeried, plan["kind"], plan["nlist"], edges=edges)


# ----------------------------------------------------------------------------- task bodies (job wrappers)
def setup_task(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads > 0:  # local tasks share this machine's cores: avoid oversubscribing them
        import faiss
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads, user_api="blas")  # numpy's BLAS (the scoring GEMMs); stays set
        faiss.omp_set_num_threads(threads)


def task_usage(extra: dict) -> dict:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {**extra, "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_gb": ru.ru_maxrss / 2**20}


def task_train(out_dir: str, plan: dict, cfg: DedupConfig, threads: int = 0) -> dict:
    setup_task(threads)
    path = layout.dedup_centroids(out_dir)
    if not path.is_file():
        atomic_save_npy(path, train_core(plan, cfg))
    return task_usage({"step": "train"})


def task_assign(out_dir: str, plan: dict, cfg: DedupConfig, block: int, threads: int = 0) -> dict:
    from curation.ivf_pieces import assign_block, piece_done, write_piece

    setup_task(threads)
    if not piece_done(out_dir, block):
        a, b = plan["blocks"][block]
        row0 = int(sum(plan["counts"][:a]))
        index_plan = _index_plan(plan, cfg)
        arrays = assign_block(_vectors(plan, (a, b)), row0, np.load(layout.dedup_centroids(out_dir)),
                              index_plan.nprobe, cfg.index.search_batch * 4)
        write_piece(out_dir, block, arrays)
    return task_usage({"step": "assign", "task": block})


def task_search(out_dir: str, plan: dict, cfg: DedupConfig, task: int, threads: int = 0) -> dict:
    setup_task(threads)
    done = layout.dedup_edges(out_dir, task, "done.json")
    if not done.is_file():
        g, bytes_read = search_core(out_dir, plan, cfg, task)
        fa, fb = spanning_forest(g.a, g.b)
        atomic_save_npy(layout.dedup_edges(out_dir, task, "forest.npy"), np.stack([fa, fb], 1))
        atomic_write_parquet(layout.dedup_edges(out_dir, task, "nn.parquet"), pa.table({
            "row": pa.array(g.query_rows, pa.int64()), "nn_row": pa.array(g.nn_row, pa.int64()),
            "nn_sim": pa.array(g.nn_sim, pa.float32())}))
        info = {"edges": len(g.a), "forest_edges": len(fa), "requeried": g.requeried,
                "bytes_read": int(bytes_read)}
        atomic_write_json(done, info)
    info = json.loads(done.read_text())
    return task_usage({"step": "search", "task": task, "bytes_read": info.get("bytes_read", 0),
                   "forest_edges": info["forest_edges"], "edges": info["edges"]})


def task_reduce(out_dir: str, plan: dict, cfg: DedupConfig, threads: int = 0) -> dict:
    setup_task(threads)

    def graph(store: EmbeddingStore) -> KnnGraph:
        if store.n != plan["n"] or [str(p) for p in store.vectors.paths] != plan["paths"]:
            raise RuntimeError("the pool changed since the sharded dedup's map tasks ran")
        return reduce_graph(out_dir, plan)

    run_dedup(out_dir, cfg, graph_fn=graph)
    return task_usage({"step": "reduce"})


# ----------------------------------------------------------------------------- orchestration
def prepare_work(out_dir: str | Path, plan: dict) -> None:
    """Keep map outputs only when they were made for this very plan (a killed run resumes)."""
    import shutil

    path = layout.dedup_work_plan(out_dir)
    if path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(plan)):
        return
    shutil.rmtree(layout.dedup_work(out_dir), ignore_errors=True)
    atomic_write_json(path, plan)


def run_dedup_sharded(out_dir: str | Path, cfg: DedupConfig, sharding: ShardingConfig,
                      executor: jobs.ExecutorConfig, *, progress: bool = True, n_tasks: int = 0) -> list[dict]:
    """Run the four steps on ``executor``; returns every task's CPU time and peak RSS."""
    out_dir = str(out_dir)
    logs = Path(out_dir) / "logs" / "dedup"
    embedder = resolve_embedder(out_dir, "pool", cfg.embedder)
    whitener, usage = None, []
    if cfg.whitening.kind != "none":  # fitted (or loaded) in a job of its own: it reads a pool sample
        usage = jobs.run_tasks(executor, logs / "whiten", "dedup-whiten", task_whiten, [(out_dir, embedder, cfg.whitening)],
                       ["dedup whiten"], gather=True, progress=progress)
        whitener = pool_whitener(out_dir, embedder, cfg.whitening)
    store = EmbeddingStore(out_dir, "pool", embedder, whitener)
    plan = make_plan(store.vectors, cfg, sharding, n_tasks)
    del store
    prepare_work(out_dir, plan)
    n_blocks, n_search = len(plan["blocks"]), len(plan["ranges"])
    threads = jobs.local_threads(executor, max(n_blocks, n_search))
    if plan["kind"] == "ivf_gemm":  # the read volume to size a shared file system for (docs: cost model)
        index_plan = _index_plan(plan, cfg)
        passes = math.ceil(plan["n"] / index_plan.query_batch)
        row_bytes = (4 if plan["whitening"] else 2) * plan["dim"] + 8 + 4 * index_plan.nprobe
        log.info("sharded dedup: %d assign blocks, %d search tasks; %d passes of %d queries each read the "
                 "pieces (%.1f GB)", n_blocks, n_search, passes, index_plan.query_batch, plan["n"] * row_bytes / 1e9)

    def step(name: str, fn: Any, calls: list[tuple], gather: bool = False) -> None:
        usage.extend(jobs.run_tasks(executor, logs / name, f"dedup-{name}", fn, calls,
                                    [f"dedup {name} task {i}/{len(calls)}" for i in range(len(calls))],
                                    gather=gather, progress=progress))

    if plan["kind"] == "ivf_gemm":
        step("train", task_train, [(out_dir, plan, cfg, 0)])
        step("assign", task_assign, [(out_dir, plan, cfg, b, threads) for b in range(n_blocks)])
    step("search", task_search, [(out_dir, plan, cfg, t, threads) for t in range(n_search)])
    step("reduce", task_reduce, [(out_dir, plan, cfg, 0)], gather=True)
    import shutil

    shutil.rmtree(layout.dedup_work(out_dir), ignore_errors=True)  # a list-ordered copy of the pool
    return usage


def pool_rows(out_dir: str | Path, embedder: str) -> int:
    """Embedded pool rows, from the ``.npy`` headers only (decides ``sharding.mode: auto``)."""
    from curation.ivf_pieces import NpyRows

    total = 0
    for shard, _ in layout.embed_shards(out_dir, "pool"):
        path = layout.embed_npy(out_dir, "pool", shard, embedder)
        if path.is_file():
            try:
                r = NpyRows(path)
            except (OSError, ValueError):
                continue  # the store skips and reports unreadable shards
            total += int(r.shape[0])
            r.close()
    return total


def use_sharded(out_dir: str | Path, cfg: DedupConfig, sharding: ShardingConfig) -> bool:
    if sharding.mode != "auto":
        return sharding.mode == "sharded"
    return sharding.sharded(pool_rows(out_dir, resolve_embedder(out_dir, "pool", cfg.embedder)))


def task_whiten(out_dir: str, embedder: str, cfg, threads: int = 0) -> dict:
    """Fit (or find) the pool's whitening before the map tasks read the pool through it."""
    setup_task(threads)
    pool_whitener(out_dir, embedder, cfg)
    return task_usage({"step": "whiten"})


def task_gathered(out_dir: str, cfg: DedupConfig, threads: int = 0) -> dict:
    """The gathered dedup as one task with its usage (the baseline benchmarks compare against)."""
    setup_task(threads)
    run_dedup(out_dir, cfg)
    return task_usage({"step": "gathered"})


def task_baseline(threads: int = 0) -> dict:
    """A task that only loads what a search task loads: the per-process memory floor (benchmarks)."""
    setup_task(threads)
    from curation import gemm_ivf, ivf_pieces  # noqa: F401

    return task_usage({"step": "baseline"})
