"""Self-deduplication of the pool (DINOv2 §3): exact, perceptual-hash and embedding near-duplicates.

Edges come from three sources and are merged into one graph:
- exact: identical sha256 of the original bytes;
- phash: 64-bit DCT hashes within ``phash_max_distance`` bits (pigeonhole
  multi-index: split the bits into d+1 blocks, two hashes within distance d
  agree exactly on at least one block, so only same-block-value pairs are checked);
- near: k-NN graph through FAISS (k neighbours ≠ self, edges with cosine ≥ threshold).
  When all k neighbours of an item clear the threshold its true neighbourhood may
  be larger, so that item is re-queried with 4× k (up to ``max_k``) until the last
  neighbour falls below the threshold;
- verified (``verify.enabled``): an item's nearest neighbours under the threshold that
  are not already in its component, kept when the two images share enough local
  features under one similarity transform (curation/verify.py); the same check refutes
  near edges whose images are both rich in keypoints yet share too few (``refute_keypoints``):
  a cosine over the threshold between two different photos of one kind is not a copy.
Connected components are found with an array union-find; each component keeps ONE
representative: the largest image (width·height), ties → smallest global index
(shard order, then row).  Both rules depend only on the data, never on search
order or thread count.  Optional SemDeDup then runs inside k-means clusters of the
surviving items (drop an item whose best cosine to an earlier item of its cluster
exceeds 1 − eps).

Output ``OUT/dedup/decisions.parquet`` (one row per ok pool image): ``id, component
(int64, = smallest global index of the component), component_size, kept, reason
(null | exact_duplicate | phash_duplicate | near_duplicate | semdedup),
representative_id, nn_id, nn_sim``.  A dropped item's reason says how it relates
to its representative: same sha256 → exact, phash within distance → phash, else near.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from curation import layout
from curation.components import connected_components
from curation.hash_edges import exact_edges, hamming64, phash_edges
from curation.index import IndexConfig, build_index
from curation.pair_verifier import StoredPairVerifier
from curation.semdedup import SemDedupConfig, semdedup
from curation.store import EmbeddingStore, Vectors, as_vectors, resolve_embedder
from curation.verify import VerifyConfig, candidate_pairs
from curation.whiten import WhiteningConfig, pool_whitener
from dinov2.utils.io import atomic_write_json, atomic_write_parquet

log = logging.getLogger(__name__)

REASONS = ("exact_duplicate", "phash_duplicate", "near_duplicate", "semdedup")


@dataclass
class DedupConfig:
    embedder: str = ""  # "" = the only embedder present for the pool
    exact: bool = True  # sha256 duplicates
    phash: bool = True
    phash_max_distance: int = 4  # Hamming bits (0 = identical hashes only)
    k: int = 64  # neighbours per item (DINOv2: 64)
    threshold: float | None = None  # edges with cosine >= threshold (DINOv2/SSCD: 0.6); null = calibrated
    max_k: int = 1024  # re-query cap for items whose k neighbours all clear the threshold
    pq_rescore_margin: float = 0.1  # IVF-PQ: re-score approximate edges above threshold - margin exactly
    index: IndexConfig = field(default_factory=IndexConfig)
    semdedup: SemDedupConfig = field(default_factory=SemDedupConfig)
    whitening: WhiteningConfig = field(default_factory=WhiteningConfig)  # pca: pool-fitted (curation/whiten.py)
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # geometric verification of near misses

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"dedup.threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.k < 1 or self.max_k < self.k:
            raise ConfigError("dedup.k must be >= 1 and dedup.max_k >= dedup.k")
        if not 0 <= self.phash_max_distance <= 16:
            raise ConfigError("dedup.phash_max_distance must be in 0..16 bits")
        if not 0.0 < self.semdedup.eps < 1.0:
            raise ConfigError("dedup.semdedup.eps must be in (0, 1)")
        self.index.validate()
        self.whitening.validate("dedup.whitening")
        self.verify.validate("dedup.verify")
        if self.verify.enabled and self.verify.candidates > self.k:
            raise ConfigError("dedup.verify.candidates must be <= dedup.k (they are taken from the k-NN graph)")


# ----------------------------------------------------------------------------- edges


@dataclass
class KnnGraph:
    a: np.ndarray  # edge endpoints (global rows), cosine >= threshold
    b: np.ndarray
    sim: np.ndarray
    nn_row: np.ndarray  # best neighbour ≠ self per row (-1 if none)
    nn_sim: np.ndarray
    requeried: int  # items that needed a larger k
    index_kind: str
    nlist: int = 0
    edges: int = -1  # above-threshold edges found (-1: len(a)); a sharded graph keeps only a forest of them
    query_rows: np.ndarray | None = None  # set: nn_row/nn_sim are for these rows only (one task's share)
    candidates: tuple[np.ndarray, np.ndarray] | None = None  # under-threshold pairs to verify (a < b)

    @property
    def n_edges(self) -> int:
        return len(self.a) if self.edges < 0 else self.edges


def _drop_self(qrows: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, k: int):
    is_self = (nbrs == qrows[:, None]) | (nbrs < 0)
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    s = np.take_along_axis(sims, order, 1)
    r = np.take_along_axis(nbrs, order, 1)
    bad = np.take_along_axis(is_self, order, 1)
    return np.where(bad, -np.inf, s), np.where(bad, -1, r)


def knn_graph(vectors: Vectors | np.ndarray, k: int = 64, threshold: float = 0.6, *, max_k: int = 1024,
              index_cfg: IndexConfig | None = None, mask: np.ndarray | None = None,
              pq_rescore_margin: float = 0.1, verify: VerifyConfig | None = None) -> KnnGraph:
    """Thresholded k-NN self-graph of the (masked) rows, searched block by block."""
    vectors = as_vectors(vectors)
    index = build_index(vectors, index_cfg, mask)
    return graph_of_batches(index, index.search_vectors(vectors, k + 1, mask, desc="dedup k-NN"), vectors,
                            k, threshold, max_k=max_k, pq_rescore_margin=pq_rescore_margin, verify=verify)


def graph_of_batches(index, batches, vectors: Vectors, k: int, threshold: float, *, max_k: int,
                     pq_rescore_margin: float, compact: bool = False, verify: VerifyConfig | None = None
                     ) -> KnnGraph:
    """Thresholded edges of self-search ``batches`` (query rows, sims, neighbour rows) of ``index``.

    With an enabled ``verify``, each query's nearest neighbours under the threshold are kept
    as ``candidates`` too.

    ``nn_row``/``nn_sim`` cover the whole pool (-1 / NaN for rows not in ``batches``), or with
    ``compact`` only the queried rows, in ``query_rows`` order (a sharded dedup task's share:
    no task allocates per-pool arrays).
    """
    nn_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    ea, eb, es = [], [], []
    ca, cb = [], []
    requeried = 0
    pq = index.plan.kind == "ivfpq"
    cut = threshold - (pq_rescore_margin if pq else 0.0)
    for qrows, sims, nbrs in batches:
        sims, nbrs = _drop_self(qrows, sims, nbrs, k)
        nn_parts.append((qrows, nbrs[:, 0].copy(), np.where(nbrs[:, 0] >= 0, sims[:, 0], np.nan).astype(np.float32)))
        if verify is not None and verify.enabled:
            pa_, pb_ = candidate_pairs(qrows, sims, nbrs, threshold, verify, self_search=True)
            ca.append(pa_)
            cb.append(pb_)
        r, s, nb, kk = qrows, sims, nbrs, k
        while True:
            sat = s[:, -1] >= cut
            can_grow = kk < min(max_k, index.ntotal - 1)
            final = ~sat if can_grow else np.ones(len(r), dtype=bool)
            qi, ci = np.nonzero(s[final] >= cut)
            ea.append(r[final][qi])
            eb.append(nb[final][qi, ci])
            es.append(s[final][qi, ci])
            if not can_grow or not sat.any():
                break
            # every neighbour cleared the threshold: the true neighbourhood may be larger
            r = r[sat]
            kk = min(kk * 4, max_k, index.ntotal - 1)
            requeried += len(r)
            s, nb = index.search(vectors.gather(r), kk + 1)
            s, nb = _drop_self(r, s, nb, kk)
    a = np.concatenate(ea) if ea else np.zeros(0, np.int64)
    b = np.concatenate(eb) if eb else np.zeros(0, np.int64)
    s = np.concatenate(es) if es else np.zeros(0, np.float32)
    if pq and len(a):  # PQ similarities are approximate: decide edges on exact cosines
        exact = np.empty(len(a), np.float32)
        for c in range(0, len(a), 65536):
            exact[c : c + 65536] = np.einsum(
                "ij,ij->i", vectors.gather(a[c : c + 65536]), vectors.gather(b[c : c + 65536]))
        s = exact
    keep = s >= threshold
    q_rows, q_nn, q_sim = (np.concatenate(c) for c in zip(*nn_parts)) if nn_parts else (
        np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if compact:
        nn_row, nn_sim = q_nn, q_sim
    else:
        nn_row = np.full(vectors.n, -1, dtype=np.int64)
        nn_sim = np.full(vectors.n, np.nan, dtype=np.float32)
        nn_row[q_rows], nn_sim[q_rows] = q_nn, q_sim
    candidates = None
    if verify is not None and verify.enabled:
        pairs = np.unique(np.stack([np.concatenate(ca), np.concatenate(cb)], 1), axis=0) if ca else np.zeros((0, 2))
        candidates = (pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64))
    return KnnGraph(a[keep], b[keep], s[keep], nn_row, nn_sim, requeried, index.plan.kind, index.plan.nlist,
                    query_rows=q_rows if compact else None, candidates=candidates)


def _check_verify(cfg: VerifyConfig, verify_fn, g: KnnGraph) -> None:
    if verify_fn is None or g.candidates is None:
        raise ValueError("dedup.verify is enabled but no verification function / candidates were given")
    if cfg.min_inliers is None or cfg.min_correlation is None:
        raise ValueError("dedup.verify.min_inliers / min_correlation are unset: give them, or let curation.calibrate "
                         "choose them")


def _unrefuted_edges(n: int, edges_a: list, edges_b: list, g: KnnGraph, cfg: VerifyConfig, verify_fn,
                     stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """The near (cosine) edges less those geometry refutes; pairs exact or perceptual-hash edges
    already join are kept unchecked."""
    if cfg.refute_keypoints <= 0 or not len(g.a):
        stats["refuted_edges"] = 0
        return g.a, g.b
    t0 = time.perf_counter()
    labels = connected_components(n, np.concatenate(edges_a) if edges_a else [],
                                  np.concatenate(edges_b) if edges_b else [])
    check = np.flatnonzero(labels[g.a] != labels[g.b])
    refuted = np.zeros(len(g.a), bool)
    refuted[check] = verify_fn(g.a[check], g.b[check]).refuted(cfg)
    stats.update(refute_checked=len(check), refuted_edges=int(refuted.sum()),
                 refute_s=round(time.perf_counter() - t0, 3))
    return g.a[~refuted], g.b[~refuted]


def _verified_edges(n: int, edges_a: list, edges_b: list, g: KnnGraph, cfg: VerifyConfig, verify_fn,
                    stats: dict) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs not yet in one component whose geometric verification passes."""
    t0 = time.perf_counter()
    labels = connected_components(n, np.concatenate(edges_a), np.concatenate(edges_b))
    a, b = g.candidates
    open_ = labels[a] != labels[b]  # pairs already linked need no pixels
    a, b = a[open_], b[open_]
    ok = verify_fn(a, b).linked(cfg)
    stats.update(verify_pairs=len(a), verified_edges=int(ok.sum()), verify_s=round(time.perf_counter() - t0, 3))
    return a[ok], b[ok]


# ----------------------------------------------------------------------------- representatives


def choose_representatives(labels: np.ndarray, pixels: np.ndarray | None = None) -> np.ndarray:
    """Representative row per row: largest ``pixels`` in the component, then smallest row."""
    n = len(labels)
    rows = np.arange(n, dtype=np.int64)
    pix = np.zeros(n, np.int64) if pixels is None else np.nan_to_num(np.asarray(pixels, np.float64)).astype(np.int64)
    order = np.lexsort((rows, -pix, labels))
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    rep_of_label = pd.Series(order[first], index=labels[order][first])
    return rep_of_label.reindex(labels).to_numpy(dtype=np.int64)


# ----------------------------------------------------------------------------- core + stage


@dataclass
class DedupResult:
    component: np.ndarray  # int64 label (smallest row of the component)
    component_size: np.ndarray
    kept: np.ndarray
    reason: np.ndarray  # object: None or a REASONS string
    representative: np.ndarray  # row of the component's representative
    nn_row: np.ndarray
    nn_sim: np.ndarray
    stats: dict
    graph: KnnGraph | None = None  # the thresholded k-NN graph (diagnostics, benchmarks)


def dedup_core(vectors: Vectors | np.ndarray, cfg: DedupConfig, *, sha256=None, phash: np.ndarray | None = None,
               phash_valid: np.ndarray | None = None, pixels: np.ndarray | None = None,
               graph: KnnGraph | None = None, verify_fn=None) -> DedupResult:
    """Deduplicate all rows of ``vectors`` (pure: arrays in, arrays out).

    ``graph``: the embedding k-NN graph when already computed (the sharded dedup's map tasks);
    otherwise it is searched here.  ``verify_fn(rows_a, rows_b) -> inliers``: geometric
    verification of candidate pairs (needed when ``cfg.verify.enabled``).
    """
    vectors = as_vectors(vectors)
    n = vectors.n
    t0 = time.perf_counter()
    edges_a, edges_b = [], []
    stats: dict = {"n": n}
    if cfg.exact and sha256 is not None:
        a, b = exact_edges(sha256)
        edges_a.append(a)
        edges_b.append(b)
        stats["exact_edges"] = len(a)
    if cfg.phash and phash is not None:
        a, b = phash_edges(phash, phash_valid, cfg.phash_max_distance)
        edges_a.append(a)
        edges_b.append(b)
        stats["phash_edges"] = len(a)
    if n > 1:
        if cfg.threshold is None:
            raise ValueError("dedup.threshold is unset: give one, or let curation.calibrate choose it")
        g = graph or knn_graph(vectors, cfg.k, cfg.threshold, max_k=cfg.max_k, index_cfg=cfg.index,
                               pq_rescore_margin=cfg.pq_rescore_margin, verify=cfg.verify)
        near_a, near_b = g.a, g.b
        if cfg.verify.enabled:
            _check_verify(cfg.verify, verify_fn, g)
            near_a, near_b = _unrefuted_edges(n, edges_a, edges_b, g, cfg.verify, verify_fn, stats)
        edges_a.append(near_a)
        edges_b.append(near_b)
        nn_row, nn_sim = g.nn_row, g.nn_sim
        graph = g
        stats.update(near_edges=g.n_edges, requeried=g.requeried, index_kind=g.index_kind, nlist=g.nlist)
        if cfg.verify.enabled:
            a, b = _verified_edges(n, edges_a, edges_b, g, cfg.verify, verify_fn, stats)
            edges_a.append(a)
            edges_b.append(b)
    else:
        nn_row, nn_sim = np.full(n, -1, np.int64), np.full(n, np.nan, np.float32)
        graph = None
    t1 = time.perf_counter()
    labels = connected_components(n, np.concatenate(edges_a) if edges_a else [], np.concatenate(edges_b) if edges_b else [])
    sizes = np.bincount(labels, minlength=n)[labels] if n else np.zeros(0, np.int64)
    rep = choose_representatives(labels, pixels) if n else np.zeros(0, np.int64)
    rows = np.arange(n)
    kept = rep == rows
    reason = np.full(n, None, dtype=object)
    dropped = ~kept
    is_exact = np.zeros(n, bool)
    if sha256 is not None and cfg.exact:
        sha = pd.Series(sha256, dtype=object).to_numpy()
        is_exact = dropped & pd.notna(sha) & (sha == sha[rep])
    is_phash = np.zeros(n, bool)
    if phash is not None and cfg.phash:
        ph = np.asarray(phash, np.int64)
        ok = np.ones(n, bool) if phash_valid is None else np.asarray(phash_valid, bool)
        is_phash = dropped & ~is_exact & ok & ok[rep] & (hamming64(ph, ph[rep]) <= cfg.phash_max_distance)
    reason[dropped] = "near_duplicate"
    reason[is_phash] = "phash_duplicate"
    reason[is_exact] = "exact_duplicate"
    if cfg.semdedup.enabled and kept.sum() > 1:
        sd = semdedup(vectors, np.flatnonzero(kept), cfg.semdedup)
        sd_rows = np.flatnonzero(kept)[sd]
        kept[sd_rows] = False
        reason[sd_rows] = "semdedup"
        stats["semdedup_dropped"] = int(sd.sum())
    stats.update(
        search_s=round(t1 - t0, 3), total_s=round(time.perf_counter() - t0, 3),
        components=len(np.unique(labels)) if n else 0, kept=int(kept.sum()),
    )
    return DedupResult(labels, sizes.astype(np.int64), kept, reason, rep, nn_row, nn_sim, stats, graph)


def decisions_path(out_dir: str | Path) -> Path:
    return layout.dedup_decisions(out_dir)


def run_dedup(out_dir: str | Path, cfg: DedupConfig | None = None, *, overwrite: bool = False,
              graph_fn=None, max_pixels: int | None = None) -> Path:
    """Stage 2: read ``OUT/embed/pool``, write ``OUT/dedup/decisions.parquet`` (+ stats.json).

    ``graph_fn(store) -> KnnGraph``: where the embedding graph comes from when not searched here
    (the sharded dedup's reduce reads it from its map tasks' edge shards).
    """
    cfg = cfg or DedupConfig()
    out = decisions_path(out_dir)
    if out.exists() and not overwrite:
        log.info("dedup already done: %s", out)
        return out
    embedder = resolve_embedder(out_dir, "pool", cfg.embedder)
    whitener = pool_whitener(out_dir, embedder, cfg.whitening)
    store = EmbeddingStore(out_dir, "pool", embedder, whitener)
    meta = store.meta
    phash = pd.to_numeric(meta["phash"], errors="coerce")
    pixels = (pd.to_numeric(meta["width"], errors="coerce") * pd.to_numeric(meta["height"], errors="coerce")).fillna(0)
    verify_fn = None
    if cfg.verify.enabled:
        if graph_fn is not None:
            raise ValueError("dedup.verify runs in the gathered dedup only")
        verify_fn = StoredPairVerifier(out_dir, layout.POOL, store.ids, cfg.verify, max_pixels)
    res = dedup_core(
        store.vectors, cfg, sha256=meta["sha256"].to_numpy(dtype=object),
        phash=phash.fillna(0).astype(np.int64).to_numpy(), phash_valid=phash.notna().to_numpy(),
        pixels=pixels.to_numpy(), graph=graph_fn(store) if graph_fn is not None and store.n > 1 else None,
        verify_fn=verify_fn,
    )
    ids = store.ids
    nn_id = np.where(res.nn_row >= 0, ids[np.maximum(res.nn_row, 0)] if len(ids) else res.nn_row, None)
    table = pa.table({
        "id": pa.array(ids.tolist(), pa.string()),
        "component": pa.array(res.component, pa.int64()),
        "component_size": pa.array(res.component_size, pa.int64()),
        "kept": pa.array(res.kept, pa.bool_()),
        "reason": pa.array(res.reason.tolist(), pa.string()),
        "representative_id": pa.array(ids[res.representative].tolist() if len(ids) else [], pa.string()),
        "nn_id": pa.array(nn_id.tolist(), pa.string()),
        "nn_sim": pa.array(res.nn_sim.astype(np.float32), pa.float32()),
    })
    stats = dict(res.stats, embedder=embedder, whitening=whitener.path.name if whitener else None,
                 shard_problems=[vars(p) for p in store.problems])
    if verify_fn is not None:
        stats.update(verify_images_read=verify_fn.images_read, verify_unreadable=len(verify_fn.unreadable),
                     verify_min_inliers=cfg.verify.min_inliers, verify_min_correlation=cfg.verify.min_correlation)
    atomic_write_json(layout.stats_path(out), stats)
    atomic_write_parquet(out, table)  # written last: its presence marks the stage done
    log.info("dedup: kept %d of %d pool images", res.stats["kept"], store.n)
    return out
