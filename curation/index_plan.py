"""Which index to build for N vectors of dimension D, and the interface every index answers.

All similarity is inner product on L2-normalised float32 vectors (= cosine).

Index choice (``IndexConfig.kind == "auto"``):
- N < ``flat_max`` (1e5): exact FAISS ``IndexFlatIP``.
- CPU, N >= ``flat_max``: ``ivf_gemm`` (:mod:`curation.gemm_ivf`): lists of ~``gemm_list_size``
  rows scanned by float32 numpy GEMMs + top-k; cost linear in N and at BLAS speed, which FAISS's
  IVF-Flat scan is not on CPU (bench/RESULTS.md has the measurements).
- GPU (or ``kind: ivf``): FAISS IVF with ``nlist = N / target_list_size`` clamped to [4·√N, 16·√N]
  (FAISS guideline): short inverted lists keep the per-query scan independent of N, and an HNSW
  coarse quantizer (for large nlist) keeps the centroid lookup logarithmic.
- IVF-PQ instead of IVF-Flat when float32 storage would exceed ``max_memory_gb``.
GPU: with ``use_gpu`` "auto" and faiss-gpu seeing a GPU, indexes and k-means run on all visible
GPUs; "always" errors without one.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from curation.choices import IndexKind, Quantizer, UseGpu, coerce
from curation.store import Vectors

AUTO_QUERY_PASSES = 16  # gemm_query_batch auto: the self-search reads the lists this many times ...
AUTO_QUERY_BATCH = (65_536, 2_097_152)  # ... with a pass of at least / at most this many queries


@dataclass
class IndexConfig:
    kind: IndexKind = IndexKind.auto
    flat_max: int = 100_000  # auto: exact flat search below this many vectors
    nlist: int = 0  # 0 = auto (N / target_list_size within [4√N, 16√N])
    target_list_size: int = 64
    nprobe: int = 16
    quantizer: Quantizer = Quantizer.auto  # auto: hnsw when nlist >= hnsw_min_nlist
    hnsw_min_nlist: int = 8192  # below this the GEMM flat quantizer beats HNSW (bench/RESULTS.md)
    hnsw_m: int = 32
    hnsw_ef_search: int = 0  # 0 = max(64, 4·nprobe)
    train_per_centroid: int = 30  # FAISS: 30..256 training vectors per centroid
    kmeans_niter: int = 10  # IVF centroids only steer the search: a few iterations suffice
    two_level_min_nlist: int = 1024  # train nlist >= this with two-level k-means (O(n·√nlist))
    pq_m: int = 0  # 0 = auto (≈ dim/8 sub-quantizers of 8 bits)
    max_memory_gb: float = 8.0  # auto switches IVF-Flat -> IVF-PQ above this
    use_gpu: UseGpu = UseGpu.auto
    search_batch: int = 16384
    seed: int = 0
    # ivf_gemm (CPU default for N >= flat_max): clusters of ~gemm_list_size rows scanned with BLAS GEMMs
    gemm_list_size: int = 1000
    gemm_train_per_centroid: int = 64
    # queries per self-search pass over the lists: a pass reads every list its queries probe once, so
    # a self-search reads them ~N / batch times; a pass holds the batch's vectors and top-k lists.
    # 0 = auto: N / 16 within [65,536, 2,097,152] (docs/curation.md, cost model: reads and memory)
    gemm_query_batch: int = 0

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        self.kind = coerce(IndexKind, self.kind, "index.kind")
        self.quantizer = coerce(Quantizer, self.quantizer, "index.quantizer")
        self.use_gpu = coerce(UseGpu, self.use_gpu, "index.use_gpu")
        if self.gemm_list_size < 1 or self.gemm_train_per_centroid < 1:
            raise ConfigError("index.gemm_list_size and index.gemm_train_per_centroid must be >= 1")
        if self.gemm_query_batch < 0:
            raise ConfigError("index.gemm_query_batch must be >= 0 (0 = auto)")
        if self.nprobe < 1 or self.search_batch < 1 or self.target_list_size < 1:
            raise ConfigError("index.nprobe, index.search_batch and index.target_list_size must be >= 1")
        if not 1 <= self.train_per_centroid <= 1024:
            raise ConfigError("index.train_per_centroid must be in 1..1024 (FAISS advises 30..256)")


def gpu_available() -> bool:
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0 and hasattr(faiss, "StandardGpuResources"))


def use_gpu(setting: str) -> bool:
    if setting == "never":
        return False
    available = gpu_available()
    if setting == "always" and not available:
        raise RuntimeError("use_gpu='always' but FAISS sees no GPU (is faiss-gpu installed?)")
    return available


@dataclass
class IndexPlan:
    kind: str  # flat | ivf | ivfpq
    nlist: int = 0
    nprobe: int = 0
    quantizer: str = "flat"
    pq_m: int = 0
    n_train: int = 0
    query_batch: int = 0  # ivf_gemm: queries per pass over the lists


def _pq_m(dim: int, requested: int) -> int:
    m = requested or max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def plan_index(n: int, dim: int, cfg: IndexConfig, gpu: bool = False) -> IndexPlan:
    """Decide index type and sizes for ``n`` vectors of ``dim`` (pure, unit-testable).

    ``auto`` on CPU picks ``ivf_gemm`` (BLAS-blocked IVF, linear in N for a fixed
    list size); on GPU FAISS's IVF-Flat; IVF-PQ once float32 storage exceeds
    ``max_memory_gb`` on either.
    """
    kind = cfg.kind
    if kind == "auto":
        if n < cfg.flat_max:
            kind = "flat"
        elif n * dim * 4 > cfg.max_memory_gb * 2**30:
            kind = "ivfpq"
        else:
            kind = "ivf" if gpu else "ivf_gemm"
    if kind == "flat" or n == 0:
        return IndexPlan("flat")
    if kind == "ivf_gemm":
        nlist = max(1, min(cfg.nlist or round(n / cfg.gemm_list_size), n))
        n_train = min(n, nlist * cfg.gemm_train_per_centroid)
        batch = cfg.gemm_query_batch or min(max(math.ceil(n / AUTO_QUERY_PASSES), AUTO_QUERY_BATCH[0]),
                                            AUTO_QUERY_BATCH[1])
        return IndexPlan("ivf_gemm", nlist, min(cfg.nprobe, nlist), "flat", 0, n_train, batch)
    root = math.sqrt(n)
    nlist = cfg.nlist or round(min(max(n / cfg.target_list_size, 4 * root), 16 * root))
    nlist = max(1, min(nlist, n))
    n_train = min(n, max(nlist * cfg.train_per_centroid, nlist))
    quantizer = cfg.quantizer
    if quantizer == "auto":
        quantizer = "hnsw" if nlist >= cfg.hnsw_min_nlist else "flat"
    return IndexPlan(kind, nlist, min(cfg.nprobe, nlist), quantizer, _pq_m(dim, cfg.pq_m) if kind == "ivfpq" else 0, n_train)


class SearchIndex(Protocol):
    """What dedup, decontamination and retrieval need of an index (FAISS-backed or GEMM IVF)."""

    plan: IndexPlan

    @property
    def ntotal(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims [q, k] float32, global rows [q, k] int64; -1 / -inf where fewer than k found)."""
        ...

    def search_vectors(self, vectors: Vectors | np.ndarray, k: int, mask: np.ndarray | None = None,
                       desc: str = "search") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Query with every (masked) row of ``vectors`` in blocks → (query rows, sims, nbr rows)."""
        ...
