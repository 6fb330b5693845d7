"""Seeded spherical k-means (FAISS) on samples of possibly memory-mapped vectors, and assignment.

For large k a flat k-means costs O(n·k·D) per iteration; two-level k-means (√k coarse groups, each
split in proportion to its size) costs O(n·√k·D), which is what makes IVF training scale.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
from tqdm.auto import tqdm

from curation.index_plan import use_gpu
from curation.store import Vectors, as_vectors, normalize_rows


def _largest_remainder(weights: np.ndarray, total: int, upper: np.ndarray) -> np.ndarray:
    """Integer split of ``total`` proportional to weights, each in [1, upper] (where upper>0)."""
    share = weights / weights.sum() * total
    alloc = np.clip(np.floor(share).astype(np.int64), 1, upper)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    i = 0
    while alloc.sum() < total and i < 10 * len(order) + total:
        j = order[i % len(order)]
        if alloc[j] < upper[j]:
            alloc[j] += 1
        i += 1
    while alloc.sum() > total:  # clipping to >=1 may overshoot: take from the largest
        j = int(np.argmax(alloc))
        alloc[j] -= 1
    return alloc


def _faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int, max_ppc: int, gpu: bool, init=None) -> np.ndarray:
    km = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=max_ppc,
        min_points_per_centroid=1, gpu=gpu, verbose=False,
    )
    km.train(x, init_centroids=init)
    return normalize_rows(km.centroids)


def kmeans_array(
    x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int = 256,
    gpu: bool = False, two_level_min_k: int = 4096, init_centroids: np.ndarray | None = None,
) -> np.ndarray:
    """Seeded spherical k-means of in-memory normalised vectors → [k, D] unit centroids.

    For large k (≥ two_level_min_k) a flat k-means costs O(n·k·D) per iteration;
    instead cluster into √k groups and split each group proportionally to its size
    (two-level k-means, O(n·√k·D)), which is what makes IVF training scale.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n points, got k={k}, n={n}")
    if k == n:
        return normalize_rows(x)
    if k < two_level_min_k or init_centroids is not None:
        return _faiss_kmeans(x, k, niter, seed, max_points_per_centroid, gpu, init_centroids)
    return two_level_kmeans(x, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                            gpu=gpu)[0]


def two_level_kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, max_points_per_centroid: int = 256,
                     gpu: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(k fine centroids, coarse parent of each fine centroid, ≈√k coarse centroids)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k1 = max(1, round(math.sqrt(k)))
    c1 = _faiss_kmeans(x, k1, niter, seed, max_points_per_centroid, gpu) if k1 > 1 else normalize_rows(x.mean(0, keepdims=True))
    labels, _ = assign_array(x, c1)
    sizes = np.bincount(labels, minlength=k1)
    nonempty = np.flatnonzero(sizes)
    alloc = np.zeros(k1, dtype=np.int64)
    alloc[nonempty] = _largest_remainder(sizes[nonempty].astype(np.float64), k, sizes[nonempty])
    order = np.argsort(labels, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    out, parent = [], []
    for c in tqdm(nonempty, desc="two-level k-means", leave=False, disable=len(nonempty) < 64):
        members = x[order[bounds[c] : bounds[c + 1]]]
        kc = int(alloc[c])
        if kc >= len(members):
            out.append(normalize_rows(members[:kc]))
        else:
            out.append(_faiss_kmeans(members, kc, niter, seed + 1 + int(c), max_points_per_centroid, gpu))
        parent.append(np.full(kc, c, np.int64))
    return normalize_rows(np.concatenate(out)), np.concatenate(parent), c1


def sample_rows(n_or_rows: int | np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted seeded sample of ``size`` rows (all rows when size >= n)."""
    rows = np.arange(n_or_rows, dtype=np.int64) if np.isscalar(n_or_rows) else np.asarray(n_or_rows, np.int64)
    if size >= len(rows):
        return rows
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(rows, size=size, replace=False))


def kmeans(
    vectors: Vectors | np.ndarray, k: int, *, mask: np.ndarray | None = None, niter: int = 20, seed: int = 0,
    max_points_per_centroid: int = 256, use_gpu_setting: str = "auto",
) -> np.ndarray:
    """k-means over (masked rows of) possibly memory-mapped vectors.

    Only a seeded sample of ``max_points_per_centroid × k`` rows is loaded,
    which is also all FAISS would use; assignment of every row is done
    afterwards by :func:`assign` in blocks.
    """
    vectors = as_vectors(vectors)
    rows = np.arange(vectors.n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
    k = min(k, len(rows))
    if k < 1:
        raise ValueError("k-means on an empty set")
    sample = sample_rows(rows, max_points_per_centroid * k, seed)
    x = vectors.gather(sample)
    return kmeans_array(x, k, niter=niter, seed=seed, max_points_per_centroid=max_points_per_centroid,
                        gpu=use_gpu(use_gpu_setting))


def _centroid_index(centroids: np.ndarray, hnsw_min: int = 16384) -> faiss.Index:
    d = centroids.shape[1]
    if len(centroids) >= hnsw_min:  # exact flat assignment is O(k) per point: go approximate
        idx = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efSearch = 128
    else:
        idx = faiss.IndexFlatIP(d)
    idx.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return idx


def assign_array(x: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (label, cosine) for each row of ``x``."""
    idx = _centroid_index(centroids)
    labels = np.empty(len(x), dtype=np.int64)
    sims = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), batch):
        d, i = idx.search(np.ascontiguousarray(x[s : s + batch], dtype=np.float32), 1)
        labels[s : s + batch], sims[s : s + batch] = i[:, 0], d[:, 0]
    return labels, sims


def assign(vectors: Vectors | np.ndarray, centroids: np.ndarray, mask: np.ndarray | None = None,
           batch: int = 65536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Assign (masked) rows block by block → (rows, labels, cosine to centroid)."""
    vectors = as_vectors(vectors)
    idx = _centroid_index(centroids)
    rows_l, lab_l, sim_l = [], [], []
    for rows, block in vectors.iter_blocks(batch, mask):
        d, i = idx.search(block, 1)
        rows_l.append(rows)
        lab_l.append(i[:, 0])
        sim_l.append(d[:, 0])
    if not rows_l:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(rows_l), np.concatenate(lab_l).astype(np.int64), np.concatenate(sim_l)
