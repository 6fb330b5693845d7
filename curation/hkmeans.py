"""Hierarchical k-means with resampling + balanced sampling (Vo et al. 2024).

Level 1 clusters the points; level t clusters the centroids of level t−1.  At
each level, after plain spherical k-means (FAISS, seeded), ``resampling_rounds``
rounds re-fit the centroids on only the ``sample_size`` points closest to each
centroid and re-assign everything: this pulls centroids away from dense modes
so the clusters cover the data more uniformly (the paper's key step).

Balanced sampling then goes top-down: a node's budget is split among its
children with one cap x such that Σ min(x, size_child) ≈ budget (small children
are taken whole, big ones are truncated), and leaves draw their budget uniformly
at random (seeded) from their points.  The selected set therefore has a much
flatter cluster-size distribution than the input.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from curation.kmeans import assign, kmeans, kmeans_array
from curation.store import ArrayVectors, Vectors, as_vectors

log = logging.getLogger(__name__)


@dataclass
class HKMeansConfig:
    enabled: bool = False
    levels: list[int] = field(default_factory=list)  # clusters per level, finest first; [] = auto
    resampling_rounds: int = 2
    sample_size: int = 0  # points per cluster kept when resampling; 0 = auto (≈ half the mean cluster size)
    niter: int = 20
    max_points_per_centroid: int = 256
    target_size: int = 0  # images to select; 0 = target_fraction of the candidates
    target_fraction: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        if any(k < 1 for k in self.levels) or any(a < b for a, b in zip(self.levels, self.levels[1:])):
            raise ConfigError("hkmeans.levels must be positive and non-increasing (finest level first)")
        if not 0.0 < self.target_fraction <= 1.0:
            raise ConfigError("hkmeans.target_fraction must be in (0, 1]")
        if self.resampling_rounds < 0 or self.target_size < 0:
            raise ConfigError("hkmeans.resampling_rounds and hkmeans.target_size must be >= 0")


def auto_levels(n: int) -> list[int]:
    """Default hierarchy: ~100 points per leaf cluster, then /10 per level while ≥ 10 clusters."""
    levels = [max(1, min(n, n // 100 or 1))]
    while levels[-1] >= 100:
        levels.append(levels[-1] // 10)
    return levels


@dataclass
class HKMeansResult:
    rows: np.ndarray  # global rows that were clustered (sorted)
    labels: list[np.ndarray]  # labels[0]: leaf cluster per row; labels[t]: parent of each level-t cluster
    centroids: list[np.ndarray]

    def top_label(self) -> np.ndarray:
        lab = self.labels[0]
        for parent in self.labels[1:]:
            lab = parent[lab]
        return lab

    def paths(self) -> np.ndarray:
        """"top/…/leaf" cluster path per row."""
        parts = [self.labels[0]]
        for parent in self.labels[1:]:
            parts.append(parent[parts[-1]])
        out = parts[-1].astype(str).astype(object)
        for p in reversed(parts[:-1]):
            out = out + "/" + p.astype(str).astype(object)
        return out


def first_centroids(vectors: Vectors, k: int, cfg: HKMeansConfig, seed: int, mask: np.ndarray | None) -> np.ndarray:
    return kmeans(vectors, k, mask=mask, niter=cfg.niter, seed=seed, max_points_per_centroid=cfg.max_points_per_centroid)


def resampled_centroids(vectors: Vectors, rows: np.ndarray, labels: np.ndarray, sims: np.ndarray,
                        centroids: np.ndarray, cfg: HKMeansConfig, seed: int, r: int) -> np.ndarray | None:
    """Resampling round ``r``: centroids re-fitted on the ``sample_size`` points closest to each
    centroid (None: too few points, the rounds stop)."""
    k = len(centroids)
    sample_size = cfg.sample_size or max(1, len(rows) // (2 * k))
    order = np.lexsort((rows, -sims, labels))
    lab_sorted = labels[order]
    starts = np.searchsorted(lab_sorted, lab_sorted, side="left")
    rank = np.arange(len(order)) - starts
    x = vectors.gather(np.sort(rows[order[rank < sample_size]]))
    if len(x) <= k:
        return None
    return kmeans_array(x, k, niter=cfg.niter, seed=seed + 1 + r, max_points_per_centroid=cfg.max_points_per_centroid,
                        init_centroids=centroids)


def _level(vectors: Vectors, k: int, cfg: HKMeansConfig, seed: int, mask: np.ndarray | None):
    """One level: k-means + resampling rounds → (rows, labels, centroids)."""
    centroids = first_centroids(vectors, k, cfg, seed, mask)
    rows, labels, sims = assign(vectors, centroids, mask)
    for r in range(cfg.resampling_rounds):
        new = resampled_centroids(vectors, rows, labels, sims, centroids, cfg, seed, r)
        if new is None:
            break
        centroids = new
        rows, labels, sims = assign(vectors, centroids, mask)
    return rows, labels, centroids


def level_sizes(cfg: HKMeansConfig, n: int) -> list[int]:
    return list(cfg.levels) or auto_levels(n)


def hierarchical_kmeans(vectors: Vectors | np.ndarray, cfg: HKMeansConfig, mask: np.ndarray | None = None,
                        level0: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> HKMeansResult:
    """``level0``: (rows, labels, centroids) of the finest level when already computed (the sharded
    retrieval assigns the pool as job arrays); the coarser levels cluster centroids only."""
    vectors = as_vectors(vectors)
    n = vectors.n if mask is None else int(np.count_nonzero(mask))
    if n == 0:
        raise ValueError("hierarchical k-means on an empty set")
    levels = level_sizes(cfg, n)
    rows, lab, cen = level0 or _level(vectors, min(levels[0], n), cfg, cfg.seed, mask)
    labels, centroids = [lab], [cen]
    for t, k in enumerate(levels[1:], start=1):
        prev = ArrayVectors(centroids[-1])
        _, lab, cen = _level(prev, min(k, prev.n), cfg, cfg.seed + 1000 * t, None)
        labels.append(lab)
        centroids.append(cen)
    return HKMeansResult(rows, labels, centroids)


def balanced_cap(sizes: np.ndarray, budget: int) -> int:
    """Largest cap x with Σ min(x, size) ≤ budget."""
    sizes = np.asarray(sizes, np.int64)
    if budget >= sizes.sum():
        return int(sizes.max(initial=0))
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_budget(sizes: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Per-child allotment min(x, size), plus the remainder spread one-by-one (seeded) on truncated children."""
    sizes = np.asarray(sizes, np.int64)
    budget = int(min(budget, sizes.sum()))
    x = balanced_cap(sizes, budget)
    alloc = np.minimum(sizes, x)
    rest = budget - int(alloc.sum())
    if rest > 0:
        room = np.flatnonzero(sizes > alloc)
        alloc[rng.choice(room, rest, replace=False)] += 1
    return alloc


def balanced_sample(result: HKMeansResult, target: int, seed: int = 0) -> np.ndarray:
    """Boolean mask over ``result.rows``: the top-down balanced selection of ``target`` rows."""
    rng = np.random.default_rng(seed)
    n_levels = len(result.labels)
    # point counts per cluster at every level
    counts = [np.bincount(result.labels[0], minlength=len(result.centroids[0]))]
    for t in range(1, n_levels):
        counts.append(np.bincount(result.labels[t], weights=counts[-1], minlength=len(result.centroids[t])).astype(np.int64))
    budget = split_budget(counts[-1], target, rng)  # top level
    for t in range(n_levels - 1, 0, -1):  # children of level t are the level t-1 clusters
        parent = result.labels[t]
        child_budget = np.zeros(len(parent), np.int64)
        order = np.argsort(parent, kind="stable")
        bounds = np.searchsorted(parent[order], np.arange(len(budget) + 1))
        for p in np.flatnonzero(budget):
            kids = order[bounds[p] : bounds[p + 1]]
            child_budget[kids] = split_budget(counts[t - 1][kids], int(budget[p]), rng)
        budget = child_budget
    leaf = result.labels[0]
    selected = np.zeros(len(leaf), dtype=bool)
    order = np.argsort(leaf, kind="stable")
    bounds = np.searchsorted(leaf[order], np.arange(len(budget) + 1))
    for c in np.flatnonzero(budget):
        members = order[bounds[c] : bounds[c + 1]]
        selected[rng.choice(members, int(budget[c]), replace=False)] = True
    return selected


def size_ratio(labels: np.ndarray, k: int | None = None) -> float:
    """max / min cluster size over non-empty clusters (the balance measure)."""
    sizes = np.bincount(labels, minlength=k or 0)
    sizes = sizes[sizes > 0]
    return float(sizes.max() / sizes.min()) if len(sizes) else 1.0
