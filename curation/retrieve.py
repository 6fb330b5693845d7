"""Retrieval / balancing of the deduplicated, decontaminated pool (DINOv2 §3, Vo et al. 2024).

Candidates = pool images kept by dedup and not contaminated.  Per curated query
set (``query-<name>`` sources):
- sample-based (a): the k nearest candidates of every query image (DINOv2: k=4,
  32 for ImageNet-1k); used by ``auto`` for sets with ≥ ``sample_min_queries`` images.
  The search is exact (curation/topk.py: per-shard GEMM chunks, ties → smaller pool row), which
  makes the sharded job (curation/retrieve_sharded.py) byte-identical; ``index.kind`` ivf / ivfpq /
  ivf_gemm gives the approximate FAISS / GEMM-IVF search instead (one gathered job only);
- cluster-based (b): FAISS k-means on the candidates (``n_clusters``); from every
  cluster holding MORE than ``min_queries_per_cluster`` query images, ``per_cluster``
  random candidates (all when fewer), at most ``max_per_set`` per set.
Optionally (c) hierarchical k-means + balanced sampling of all candidates to a
target size (curation/hkmeans.py); its selection is added to (a)/(b).  With no
query sets, (c) alone decides — or, without (c), every candidate is kept.
All random choices derive from ``seed`` (and the set name / cluster id), so
reruns select the same images.

Outputs ``OUT/retrieve/selection.parquet`` (one row per candidate): ``id, selected,
query_sets (comma-separated or null), method (comma-separated: sample | cluster |
hkmeans | all; null when not selected), best_query_id, best_query_sim (sample-based
hits), cluster (level-0 k-means cluster, else hk leaf cluster, else -1), hk_path``;
and ``OUT/retrieve/clusters.json`` with cluster sizes before/after selection.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from curation import layout
from curation.choices import RetrieveMethod, coerce
from curation.hkmeans import HKMeansConfig, HKMeansResult, balanced_sample, hierarchical_kmeans, size_ratio
from curation.index import IndexConfig, build_index
from curation.kmeans import assign, kmeans
from curation.retrieval_plan import auto_method, auto_n_clusters, selection_warnings
from curation.store import EmbeddingStore, Vectors, as_vectors, list_sources, resolve_embedder
from curation.topk import block_topk, keep_topk
from dinov2.utils.io import atomic_write_json, atomic_write_parquet

log = logging.getLogger(__name__)


@dataclass
class QuerySetConfig:
    name: str = ""  # query set name (the source is "query-<name>")
    method: RetrieveMethod = RetrieveMethod.auto
    k: int = 0  # sample-based neighbours per query; 0 = RetrieveConfig.sample_k
    max_per_set: int = 0  # 0 = RetrieveConfig.max_per_set


@dataclass
class RetrieveConfig:
    embedder: str = ""  # "" = the only embedder present for the pool
    query_sets: list[QuerySetConfig] = field(default_factory=list)  # overrides; unlisted sets use defaults
    default_method: RetrieveMethod = RetrieveMethod.auto
    sample_min_queries: int = 0  # auto: 0 = by the pool/query ratio (curation/retrieval_plan.py); N = sets >= N
    sample_k: int = 4
    n_clusters: int = 0  # cluster-based k-means size; 0 = auto from the candidates (curation/retrieval_plan.py)
    min_queries_per_cluster: int = 3  # use clusters holding MORE than this many query images
    per_cluster: int = 10_000
    max_per_set: int = 1_000_000
    kmeans_niter: int = 20
    keep_all_without_queries: bool = True  # no query sets and no hkmeans → select every candidate
    hkmeans: HKMeansConfig = field(default_factory=HKMeansConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    seed: int = 0

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        for qs in self.query_sets:
            if not qs.name:
                raise ConfigError("retrieve.query_sets entries need a 'name'")
            qs.method = coerce(RetrieveMethod, qs.method, f"retrieve.query_sets.{qs.name}.method")
        self.default_method = coerce(RetrieveMethod, self.default_method, "retrieve.default_method")
        if self.sample_k < 1 or self.per_cluster < 1 or self.max_per_set < 1:
            raise ConfigError("retrieve.sample_k, per_cluster and max_per_set must be >= 1")
        self.hkmeans.validate()
        self.index.validate()

    def for_set(self, name: str, n_queries: int, n_candidates: int = 0) -> tuple[str, int, int]:
        """(method, k, cap) for a query set, resolving overrides and ``auto``."""
        return self.explain_set(name, n_queries, n_candidates)[:3]

    def explain_set(self, name: str, n_queries: int, n_candidates: int = 0) -> tuple[str, int, int, str]:
        """:meth:`for_set` plus why that method was chosen."""
        qs = next((q for q in self.query_sets if q.name == name), QuerySetConfig(name=name))
        method = qs.method if qs.method != "auto" else self.default_method
        why = f"set in the config (method: {method})"
        if method == "auto":
            method, why = auto_method(n_candidates, n_queries, self.sample_min_queries)
        return method, qs.k or self.sample_k, qs.max_per_set or self.max_per_set, why


@dataclass
class QuerySet:
    name: str
    vectors: Vectors | np.ndarray
    ids: np.ndarray  # query image ids (for best_query_id)


@dataclass
class RetrieveResult:
    rows: np.ndarray  # candidate global rows (sorted)
    selected: np.ndarray
    query_sets: np.ndarray  # object: comma-joined names or None
    method: np.ndarray  # object
    best_query_id: np.ndarray  # object
    best_query_sim: np.ndarray  # float32, NaN when none
    cluster: np.ndarray  # int64
    hk_path: np.ndarray  # object
    clusters: dict  # summary for clusters.json


def _stable_seed(*parts) -> list[int]:
    return [zlib.crc32(str(p).encode()) for p in parts]


def _join(sets: list[set[str]]) -> np.ndarray:
    return np.array([",".join(sorted(s)) if s else None for s in sets], dtype=object)


@dataclass
class Evidence:
    """What the heavy steps found, in one job (:func:`retrieve_core`) or collected from array tasks
    (curation/retrieve_sharded.py); :func:`select` turns it into the selection."""

    hits: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)  # sample sets:
    # (query row, cosine, global pool row) of every query's k best candidates (curation/topk.py)
    centroids: np.ndarray | None = None  # cluster-based k-means
    km_labels: np.ndarray | None = None  # k-means cluster of each candidate (aligned with the candidate rows)
    k_why: str = ""
    hk: HKMeansResult | None = None


def set_plans(query_sets: list[QuerySet], cfg: RetrieveConfig, n: int) -> tuple[dict, list[tuple]]:
    """(explanations by set name, [(set, method, k, cap)] of the sets that retrieve anything)."""
    explained = {qs.name: cfg.explain_set(qs.name, as_vectors(qs.vectors).n, n) for qs in query_sets}
    plans = [(qs, *explained[qs.name][:3]) for qs in query_sets]
    return explained, [p for p in plans if p[1] != "none"]


def cluster_count(cfg: RetrieveConfig, n: int) -> tuple[int, str]:
    return (min(cfg.n_clusters, n), "set in the config") if cfg.n_clusters else auto_n_clusters(n)


def exact_search(cfg: RetrieveConfig) -> bool:
    """Sample-based search is exact (curation/topk.py) unless ``retrieve.index.kind`` asks for an
    approximate index (one job only: its results depend on how the pool is split)."""
    return cfg.index.kind in ("auto", "flat")


def sample_hits(pool: Vectors, mask: np.ndarray, queries: Vectors | np.ndarray, k: int,
                index=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, cosine, pool row) of every query's k best candidates: exact, or from ``index``."""
    qv = as_vectors(queries)
    if index is None:
        return block_topk(pool, qv.load_all(), k, mask)
    parts = []
    for qrows, sims, nbrs in index.search_vectors(qv, k, desc="retrieve"):
        qi, j = np.nonzero(nbrs >= 0)
        parts.append((qrows[qi], sims[qi, j], nbrs[qi, j]))
    return keep_topk(*(np.concatenate(p) for p in zip(*parts)), k)


def retrieve_core(pool: Vectors | np.ndarray, candidates: np.ndarray | None, query_sets: list[QuerySet],
                  cfg: RetrieveConfig) -> RetrieveResult:
    """Select candidates (boolean mask over pool rows; None = all) for the query sets."""
    pool = as_vectors(pool)
    mask = np.ones(pool.n, bool) if candidates is None else np.asarray(candidates, bool)
    rows = np.flatnonzero(mask).astype(np.int64)
    n = len(rows)
    _, plans = set_plans(query_sets, cfg, n)
    ev = Evidence()
    if n:
        index = None
        if not exact_search(cfg) and any(m == "sample" for _, m, _, _ in plans):
            index = build_index(pool, cfg.index, mask)
        for qs, method, k, _ in plans:
            if method == "sample" and as_vectors(qs.vectors).n:
                ev.hits[qs.name] = sample_hits(pool, mask, qs.vectors, k, index)
        if any(m == "cluster" for _, m, _, _ in plans):
            k, ev.k_why = cluster_count(cfg, n)
            ev.centroids = kmeans(pool, k, mask=mask, niter=cfg.kmeans_niter, seed=cfg.seed)
            arows, ev.km_labels, _ = assign(pool, ev.centroids, mask)
            assert np.array_equal(arows, rows)
        if cfg.hkmeans.enabled:
            ev.hk = hierarchical_kmeans(pool, cfg.hkmeans, mask)
            assert np.array_equal(ev.hk.rows, rows)
    return select(pool.n, rows, query_sets, ev, cfg)


def select(n_pool: int, rows: np.ndarray, query_sets: list[QuerySet], ev: Evidence,
           cfg: RetrieveConfig) -> RetrieveResult:
    """The per-set picks, caps and hierarchical balancing over the candidate ``rows`` (sorted)."""
    n = len(rows)
    pos = np.full(n_pool, -1, np.int64)
    pos[rows] = np.arange(n)
    hit_sets: list[set[str]] = [set() for _ in range(n)]
    hit_methods: list[set[str]] = [set() for _ in range(n)]
    best_sim = np.full(n, -np.inf, np.float32)
    best_qid = np.full(n, None, dtype=object)
    cluster = np.full(n, -1, np.int64)
    hk_path = np.full(n, None, dtype=object)
    info: dict = {"candidates": n, "per_set": {}}
    explained, plans = set_plans(query_sets, cfg, n)

    def mark(sel_pos: np.ndarray, name: str, method: str) -> None:
        for p in sel_pos.tolist():
            hit_sets[p].add(name)
            hit_methods[p].add(method)

    km_labels, centroids = ev.km_labels, ev.centroids
    if km_labels is not None:
        cluster = km_labels.copy()
        info["kmeans"] = {"n_clusters": len(centroids), "why": ev.k_why,
                          "sizes_before": np.bincount(km_labels, minlength=len(centroids)).tolist()}
    for qs, method, k, cap in plans:
        qv = as_vectors(qs.vectors)
        if qv.n == 0 or n == 0:
            info["per_set"][qs.name] = {"method": method, "n_queries": qv.n, "selected": 0}
            continue
        chosen = np.zeros(0, np.int64)
        set_info: dict = {"method": method, "n_queries": qv.n, "why": explained[qs.name][3]}
        if method == "sample":
            qrow, s, r = ev.hits[qs.name]
            p = pos[r]
            # best hit per candidate: highest similarity, ties → smallest query id (earlier sets win ties)
            hits = pd.DataFrame({"p": p, "s": s, "q": np.asarray(qs.ids, dtype=object)[qrow]}).sort_values(
                ["p", "s", "q"], ascending=[True, False, True], kind="stable").drop_duplicates("p")
            hp, hs, hq = hits["p"].to_numpy(), hits["s"].to_numpy(np.float32), hits["q"].to_numpy(object)
            better = hs > best_sim[hp]
            best_sim[hp[better]] = hs[better]
            best_qid[hp[better]] = hq[better]
            chosen = np.unique(p)
        else:  # cluster-based
            _, qlab, _ = assign(qv, centroids)
            qcount = np.bincount(qlab, minlength=len(centroids))
            eligible = np.flatnonzero(qcount > cfg.min_queries_per_cluster)
            order = np.argsort(km_labels, kind="stable")
            bounds = np.searchsorted(km_labels[order], np.arange(len(centroids) + 1))
            picks = []
            for c in eligible.tolist():
                members = order[bounds[c] : bounds[c + 1]]
                if len(members) > cfg.per_cluster:
                    members = np.random.default_rng(_stable_seed(cfg.seed, qs.name, c)).choice(
                        members, cfg.per_cluster, replace=False)
                picks.append(members)
            chosen = np.unique(np.concatenate(picks)) if picks else chosen
            set_info["eligible_clusters"] = len(eligible)
        if len(chosen) > cap:
            rng = np.random.default_rng(_stable_seed(cfg.seed, qs.name, "cap"))
            chosen = np.sort(rng.choice(chosen, cap, replace=False))
        mark(chosen, qs.name, method)
        set_info["selected"] = len(chosen)
        info["per_set"][qs.name] = set_info
    selected = np.array([bool(s) for s in hit_sets], dtype=bool) if n else np.zeros(0, bool)
    if cfg.hkmeans.enabled and n:
        hk = ev.hk
        target = cfg.hkmeans.target_size or round(cfg.hkmeans.target_fraction * n)
        pick = balanced_sample(hk, min(target, n), seed=cfg.hkmeans.seed)
        for p in np.flatnonzero(pick).tolist():
            hit_methods[p].add("hkmeans")
        selected |= pick
        hk_path = hk.paths()
        leaf, top = hk.labels[0], hk.top_label()
        if km_labels is None:
            cluster = leaf.copy()
        k_leaf, k_top = len(hk.centroids[0]), len(hk.centroids[-1])
        info["hkmeans"] = {
            "levels": [len(c) for c in hk.centroids], "target": int(target), "selected": int(pick.sum()),
            "leaf_sizes_before": np.bincount(leaf, minlength=k_leaf).tolist(),
            "leaf_sizes_after": np.bincount(leaf[pick], minlength=k_leaf).tolist(),
            "top_sizes_before": np.bincount(top, minlength=k_top).tolist(),
            "top_sizes_after": np.bincount(top[pick], minlength=k_top).tolist(),
            "leaf_max_min_ratio_before": size_ratio(leaf, k_leaf),
            "leaf_max_min_ratio_after": size_ratio(leaf[pick], k_leaf),
        }
    if not plans and not cfg.hkmeans.enabled and cfg.keep_all_without_queries:
        selected[:] = True
        for m in hit_methods:
            m.add("all")
    if km_labels is not None:
        info["kmeans"]["sizes_after"] = np.bincount(km_labels[selected], minlength=info["kmeans"]["n_clusters"]).tolist()
    method = _join(hit_methods)
    method[~selected] = None
    info["selected"] = int(selected.sum())
    info["warnings"] = selection_warnings(n, info["selected"], bool(plans))
    for w in info["warnings"]:
        log.warning("retrieval: %s", w)
    best = np.where(np.isfinite(best_sim), best_sim, np.nan).astype(np.float32)
    return RetrieveResult(rows, selected, _join(hit_sets), method, best_qid, best, cluster, hk_path, info)


def selection_path(out_dir: str | Path) -> Path:
    return layout.retrieve_selection(out_dir)


def candidate_mask(out_dir: str | Path, ids: np.ndarray) -> np.ndarray:
    """Pool rows kept by dedup and not contaminated (decontamination optional)."""
    dedup_file = layout.dedup_decisions(out_dir)
    if not dedup_file.exists():
        raise FileNotFoundError(f"retrieval needs the dedup decisions: {dedup_file} is missing (run dedup first)")
    dd = pq.read_table(dedup_file, columns=["id", "kept"]).to_pandas()
    keep = pd.Series(dd["kept"].to_numpy(), index=dd["id"].to_numpy()).reindex(ids).fillna(False).to_numpy(bool).copy()
    dc_file = layout.decontaminate_decisions(out_dir)
    if dc_file.exists():
        dc = pq.read_table(dc_file, columns=["id", "contaminated"]).to_pandas()
        bad = pd.Series(dc["contaminated"].to_numpy(), index=dc["id"].to_numpy()).reindex(ids).fillna(False)
        keep = keep & ~bad.to_numpy(bool)
    else:
        log.warning("no decontamination decisions at %s: eval near-copies are not removed", dc_file)
    return keep


def run_retrieve(out_dir: str | Path, cfg: RetrieveConfig | None = None, *, overwrite: bool = False) -> Path:
    """Stage 4: candidates + ``query-*`` embeddings → selection.parquet + clusters.json."""
    cfg = cfg or RetrieveConfig()
    out = selection_path(out_dir)
    if out.exists() and not overwrite:
        log.info("retrieval already done: %s", out)
        return out
    embedder = resolve_embedder(out_dir, layout.POOL, cfg.embedder)
    pool = EmbeddingStore(out_dir, layout.POOL, embedder)
    res = retrieve_core(pool.vectors, candidate_mask(out_dir, pool.ids), load_query_sets(out_dir, embedder), cfg)
    return write_selection(out_dir, pool.ids, res, embedder)


def load_query_sets(out_dir: str | Path, embedder: str) -> list[QuerySet]:
    query_sets = []
    for source in list_sources(out_dir, layout.QUERY_PREFIX):
        qstore = EmbeddingStore(out_dir, source, embedder)
        query_sets.append(QuerySet(source.removeprefix(layout.QUERY_PREFIX), qstore.vectors, qstore.ids))
    return query_sets


def write_selection(out_dir: str | Path, pool_ids: np.ndarray, res: RetrieveResult, embedder: str) -> Path:
    """``selection.parquet`` + ``clusters.json`` (the gathered and the sharded job both write here)."""
    out = selection_path(out_dir)
    ids = pool_ids[res.rows]
    table = pa.table({
        "id": pa.array(ids.tolist(), pa.string()),
        "selected": pa.array(res.selected, pa.bool_()),
        "query_sets": pa.array(res.query_sets.tolist(), pa.string()),
        "method": pa.array(res.method.tolist(), pa.string()),
        "best_query_id": pa.array(res.best_query_id.tolist(), pa.string()),
        "best_query_sim": pa.array(res.best_query_sim, pa.float32()),
        "cluster": pa.array(res.cluster, pa.int64()),
        "hk_path": pa.array(res.hk_path.tolist(), pa.string()),
    })
    atomic_write_json(layout.retrieve_clusters(out_dir), dict(res.clusters, embedder=embedder))
    atomic_write_parquet(out, table)
    log.info("retrieval: selected %d of %d candidates", res.clusters["selected"], len(ids))
    return out
