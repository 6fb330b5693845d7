"""SemDeDup (Abbas et al. 2023) inside k-means clusters of the items that survive near-dup removal.

An item is dropped when its best cosine to an *earlier* member of its cluster (smaller global row)
exceeds 1 - eps, so the result depends only on the data, never on search order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from curation.kmeans import assign, kmeans
from curation.store import Vectors, as_vectors


@dataclass
class SemDedupConfig:
    enabled: bool = False
    n_clusters: int = 0  # 0 = auto: one cluster per ~1000 items
    eps: float = 0.05  # drop when cosine to an earlier cluster member > 1 - eps
    niter: int = 20
    seed: int = 0



def semdedup(vectors: Vectors | np.ndarray, rows: np.ndarray, cfg: SemDedupConfig,
             block: int = 2048) -> np.ndarray:
    """Boolean mask over ``rows``: True where SemDeDup drops the item."""
    vectors = as_vectors(vectors)
    rows = np.sort(np.asarray(rows, np.int64))
    drop = np.zeros(len(rows), dtype=bool)
    if len(rows) < 2:
        return drop
    n_clusters = cfg.n_clusters or max(1, len(rows) // 1000)
    mask = np.zeros(vectors.n, dtype=bool)
    mask[rows] = True
    centroids = kmeans(vectors, min(n_clusters, len(rows)), mask=mask, niter=cfg.niter, seed=cfg.seed)
    arows, labels, _ = assign(vectors, centroids, mask)
    pos = np.searchsorted(rows, arows)
    order = np.lexsort((arows, labels))
    labels_sorted = labels[order]
    starts = np.flatnonzero(np.r_[True, labels_sorted[1:] != labels_sorted[:-1]])
    ends = np.r_[starts[1:], len(order)]
    limit = 1.0 - cfg.eps
    for s, e in zip(starts, ends):
        members = arows[order[s:e]]  # sorted by global row: "earlier" = smaller row
        if len(members) < 2:
            continue
        x = vectors.gather(members)
        for c in range(1, len(members), block):
            sims = x[c : c + block] @ x[: c + block].T
            # only strictly earlier members count (upper triangle)
            sims[np.arange(sims.shape[0])[:, None] + c <= np.arange(sims.shape[1])[None, :]] = -np.inf
            best = sims.max(axis=1)
            drop[pos[order[s + c : s + c + len(best)]]] = best > limit
    return drop
