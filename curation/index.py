"""Build the index :func:`curation.index_plan.plan_index` chooses; the FAISS-backed kinds live here.

Kinds and when each is chosen: :mod:`curation.index_plan`.  k-means: :mod:`curation.kmeans`; the
CPU GEMM IVF: :mod:`curation.gemm_ivf`.  Vectors are added shard by shard from the memmaps; with a
flat coarse quantizer on CPU, centroid lookup for add and search is one numpy GEMM + top-k per batch
(:class:`~curation.gemm_ivf.CoarseQuantizer`), then FAISS scans its inverted lists.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import faiss
import numpy as np
from tqdm.auto import tqdm

from curation.gemm_ivf import CoarseQuantizer, GemmIvfIndex
from curation.index_plan import IndexConfig, IndexPlan, SearchIndex, plan_index, use_gpu
from curation.kmeans import kmeans_array, sample_rows
from curation.store import Vectors, as_vectors

log = logging.getLogger(__name__)

__all__ = ["FaissIndex", "IndexConfig", "SearchIndex", "build_index"]


class FaissIndex:
    """A FAISS index over selected rows of a Vectors, answering in global rows (a SearchIndex)."""

    def __init__(self, index: faiss.Index, rows: np.ndarray, plan: IndexPlan, cfg: IndexConfig, gpu: bool,
                 coarse: CoarseQuantizer | None = None):
        self.index = index
        self.rows = rows  # index position -> global row
        self.plan = plan
        self.cfg = cfg
        self.gpu = gpu
        self.coarse = coarse  # BLAS quantizer used instead of the index's own (CPU IVF, flat quantizer)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims [q, k] float32, global rows [q, k] int64; -1 / -inf where fewer than k found)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sims = np.full((len(q), k), -np.inf, dtype=np.float32)
        rows = np.full((len(q), k), -1, dtype=np.int64)
        if self.ntotal == 0 or len(q) == 0:
            return sims, rows
        kk = min(k, self.ntotal) if not self.gpu else min(k, self.ntotal, 2048)
        for s in range(0, len(q), self.cfg.search_batch):
            qb = q[s : s + self.cfg.search_batch]
            if self.coarse is not None:
                dq, iq = self.coarse.search(qb, self.plan.nprobe)
                d, i = self.index.search_preassigned(qb, kk, iq, dq)
            else:
                d, i = self.index.search(qb, kk)
            ok = i >= 0
            sims[s : s + len(d), :kk] = np.where(ok, d, -np.inf)
            rows[s : s + len(d), :kk] = np.where(ok, self.rows[np.maximum(i, 0)], -1)
        return sims, rows

    def search_vectors(self, vectors: Vectors | np.ndarray, k: int, mask: np.ndarray | None = None,
                       desc: str = "search") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Query with every (masked) row of ``vectors`` in blocks → (query rows, sims, nbr rows)."""
        vectors = as_vectors(vectors)
        total = vectors.n if mask is None else int(np.count_nonzero(mask))
        bar = tqdm(total=total, desc=desc, leave=False, disable=total < 200_000)
        for qrows, block in vectors.iter_blocks(self.cfg.search_batch, mask):
            sims, nbrs = self.search(block, k)
            if bar is not None:
                bar.update(len(qrows))
            yield qrows, sims, nbrs
        if bar is not None:
            bar.close()


def build_index(vectors: Vectors | np.ndarray, cfg: IndexConfig | None = None,
                mask: np.ndarray | None = None) -> SearchIndex:
    """Build the index ``plan_index`` chooses over the (masked) rows of ``vectors``."""
    cfg = cfg or IndexConfig()
    vectors = as_vectors(vectors)
    rows = np.arange(vectors.n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
    n, d = len(rows), vectors.dim
    gpu = use_gpu(cfg.use_gpu)
    plan = plan_index(n, d, cfg, gpu)
    if plan.kind == "ivf_gemm":
        return GemmIvfIndex.build(vectors, rows, plan, cfg, mask)
    coarse = None
    if plan.kind == "flat":
        index = faiss.IndexFlatIP(max(d, 1))
        for _, block in vectors.iter_blocks(cfg.search_batch * 4, mask):
            index.add(block)
    else:
        train = vectors.gather(sample_rows(rows, plan.n_train, cfg.seed))
        centroids = kmeans_array(train, plan.nlist, niter=cfg.kmeans_niter, seed=cfg.seed, gpu=gpu,
                                 two_level_min_k=cfg.two_level_min_nlist)
        use_hnsw = plan.quantizer == "hnsw" and not gpu  # GPU IVF wants a flat quantizer
        if use_hnsw:
            quantizer = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = 80
            quantizer.hnsw.efSearch = cfg.hnsw_ef_search or max(64, 4 * plan.nprobe)
        else:
            quantizer = faiss.IndexFlatIP(d)
        quantizer.add(centroids)
        if plan.kind == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, plan.nlist, faiss.METRIC_INNER_PRODUCT)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, plan.nlist, plan.pq_m, 8, faiss.METRIC_INNER_PRODUCT)
            index.pq.cp.niter = cfg.kmeans_niter  # codebook k-means: FAISS's 25 iterations are slow on CPU
        # The quantizer already holds nlist trained centroids, so train() only fits PQ codebooks.
        index.train(train)
        index.nprobe = plan.nprobe
        del train
        coarse = CoarseQuantizer(centroids) if not use_hnsw and not gpu else None
        bar = tqdm(total=n, desc="index add", leave=False, disable=n < 200_000)
        for _, block in vectors.iter_blocks(cfg.search_batch * 4, mask):
            if coarse is not None:
                _, assign_ = coarse.search(block, 1)
                index.add_core(len(block), faiss.swig_ptr(block), None, faiss.swig_ptr(np.ascontiguousarray(assign_[:, 0])))
            else:
                index.add(block)
            if bar is not None:
                bar.update(len(block))
        if bar is not None:
            bar.close()
    if gpu:
        index = _to_gpu(index, plan)
    log.info("built %s index over %d vectors (nlist=%d, nprobe=%d, quantizer=%s, gpu=%s)",
             plan.kind, n, plan.nlist, plan.nprobe, plan.quantizer, gpu)
    return FaissIndex(index, rows, plan, cfg, gpu, coarse)


def _to_gpu(index: faiss.Index, plan: IndexPlan) -> faiss.Index:  # pragma: no cover - needs a GPU
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = True  # embeddings are float16 anyway
    co.shard = True  # split the database across GPUs instead of replicating it
    gpu_index = faiss.index_cpu_to_all_gpus(index, co)
    if plan.kind != "flat":
        faiss.GpuParameterSpace().set_index_parameter(gpu_index, "nprobe", plan.nprobe)
    return gpu_index
