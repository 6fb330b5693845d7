"""Synthetic embedding pools for the search benchmarks: clustered vectors with planted near-duplicates.

Like real embeddings: a mixture of ~N/1000 gaussians on the sphere with varied spreads (pairwise
cosine inside a cluster ≈ 0.2–0.5), plus planted near-duplicate pairs (cosine ≥ 0.9), written as
float16 ``.npy`` shards the way the embed stage writes them.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from curation.store import ShardedVectors

DIM = 384
SHARD = 100_000


def make_shards(n: int, folder: Path, seed: int = 0, dup_frac: float = 0.05, *, dim: int = DIM,
                shard_rows: int = SHARD, name: str = "s{:06d}.npy"):
    """Write ``n`` rows as float16 shards ``folder/name.format(i)``; returns (paths, planted pairs [P, 2])."""
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // 1000)
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(1.1, 2.0, n_clusters).astype(np.float32)  # cos(point, centre) ≈ 0.45..0.67
    paths, pairs = [], []
    for start in range(0, n, shard_rows):
        rows = min(shard_rows, n - start)
        n_dup = int(rows * dup_frac / 2)
        n_base = rows - n_dup
        lab = rng.integers(0, n_clusters, n_base)
        x = centres[lab] + spread[lab, None] * rng.standard_normal((n_base, dim)).astype(np.float32) / math.sqrt(dim)
        src = rng.choice(n_base, n_dup, replace=False)
        noise = rng.uniform(0.1, 0.45, n_dup).astype(np.float32)[:, None]  # cosine to the source ≥ ~0.9
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        d = x[src] + noise * rng.standard_normal((n_dup, dim)).astype(np.float32) / math.sqrt(dim)
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        block = np.concatenate([x, d])
        perm = rng.permutation(rows)  # scatter duplicates among their shard
        where = np.empty(rows, np.int64)
        where[perm] = np.arange(rows)
        p = folder / name.format(len(paths))
        np.save(p, block[perm].astype(np.float16))
        paths.append(p)
        pairs.append(start + np.stack([where[src], where[n_base + np.arange(n_dup)]], 1))
    pairs = np.concatenate(pairs)
    v = ShardedVectors(paths)
    cos = np.einsum("ij,ij->i", v.gather(pairs[:, 0]), v.gather(pairs[:, 1]))
    return paths, pairs[cos >= 0.9]  # planted pairs are defined as cosine >= 0.9 after float16
