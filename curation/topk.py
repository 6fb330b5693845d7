"""Exact k nearest candidates of every query, computed so that any split of the pool gives the same bits.

Sample-based retrieval (curation/retrieve.py) and its sharded form (curation/retrieve_sharded.py)
both call :func:`block_topk`.  The pool is read in chunks of ``CHUNK_ROWS`` rows at fixed offsets
inside each embed shard (``iter_blocks`` without a mask) and the queries in batches of
``QUERY_BATCH`` rows, so a similarity is always the product of the same two GEMM operands, whichever
block of whole shards a task holds.  Non-candidates are masked after the GEMM (masking before would
change the operand shapes).  Ties are broken by the smaller pool row, which makes the top-k a total
order: per-block top-k lists merged with :func:`keep_topk` equal the top-k of the whole pool.

Scoring is numpy only (float32 GEMMs through numpy's BLAS, :func:`similarities`; top-k by
partition, :func:`top_k`), so the search tasks of the sharded stages never import torch.
"""
from __future__ import annotations

import numpy as np

from curation.store import Vectors, as_vectors

CHUNK_ROWS = 8192  # pool rows per GEMM (fixed offsets inside each shard)
QUERY_BATCH = 2048  # query rows per GEMM: a 2048 × 8192 float32 similarity block is 64 MiB


def similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` for float32 rows, always one general GEMM.

    numpy computes ``x @ x.T`` of one buffer with a symmetric rank-k update, whose rounding differs
    from the GEMM the same rows get next to other rows; a shared buffer is copied first.
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    b = np.ascontiguousarray(b, dtype=np.float32)
    if a.size and b.size and a.ctypes.data == b.ctypes.data:
        b = b.copy()
    return a @ b.T


def top_k(s: np.ndarray, k: int, key=None, chunk: int = 1 << 22) -> np.ndarray:
    """Columns [n, k] of the ``k`` largest entries of each row of ``s`` [n, m], in ascending column order.

    Ties at the k-th value go to the smaller column, or with ``key`` (a function of row indices →
    [len, m] int64) to the smaller key, so the selected set is a total order's top-k.  Rows are
    processed in chunks of ~``chunk`` entries (each row's result is its own).  ``k >= m``: all columns.
    """
    n, m = s.shape
    if k >= m:
        return np.broadcast_to(np.arange(m, dtype=np.int64), (n, m)).copy()
    if k < 1:
        return np.zeros((n, 0), np.int64)
    out = np.empty((n, k), np.int64)
    step = max(1, chunk // max(m, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        x = s[a:b]
        if np.isnan(x).any():
            raise ValueError("top_k: NaN similarities (non-finite embeddings?)")
        if key is None and m >= 64 * k:
            out[a:b] = _few_of_many(x, k)
            continue
        kth = np.partition(x, m - k, axis=1)[:, m - k : m - k + 1]
        take = x >= kth
        tied = np.flatnonzero(take.sum(1) != k)
        if len(tied):
            sub, kt = x[tied], kth[tied]
            if key is None:
                eq = sub == kt
                need = k - (sub > kt).sum(1, keepdims=True)
                take[tied] = (sub > kt) | (eq & (np.cumsum(eq, axis=1) <= need))
            else:
                first = np.lexsort((key(tied + a), -sub), axis=-1)[:, :k]
                t = np.zeros(sub.shape, bool)
                np.put_along_axis(t, first, True, axis=1)
                take[tied] = t
        out[a:b] = np.nonzero(take)[1].reshape(b - a, k)
    return out


def select_k(s: np.ndarray, k: int, key=None) -> np.ndarray:
    """The columns of :func:`top_k` (same set, same tie rule) in no particular order, for callers that
    sort later: one ``argpartition``; only rows with a tie at the k-th value take :func:`top_k`'s path."""
    n, m = s.shape
    if k >= m or k < 1 or n == 0:
        return top_k(s, k, key)
    idx = np.argpartition(s, m - k, axis=1)[:, m - k :]
    kth = np.take_along_axis(s, idx, 1).min(1, keepdims=True)
    if np.isnan(kth).any():
        raise ValueError("top_k: NaN similarities (non-finite embeddings?)")
    tied = np.flatnonzero((s >= kth).sum(1) > k)
    if len(tied):
        idx[tied] = top_k(s[tied], k, None if key is None else (lambda rows: key(tied[rows])))
    return idx


def _few_of_many(x: np.ndarray, k: int) -> np.ndarray:
    """:func:`top_k` (no key) for k << m, ~4× faster than a partition at k = 10, m = 8192: the k-th
    largest of 4k group maxima is a threshold that k groups reach, so every entry of the top-k (ties
    included) is at or above it; the few entries that are get sorted exactly."""
    r, m = x.shape
    g = m // (4 * k)
    n_groups = m // g
    gmax = x[:, : n_groups * g].reshape(r, n_groups, g).max(axis=2)
    if n_groups * g < m:
        gmax = np.concatenate([gmax, x[:, n_groups * g :].max(axis=1, keepdims=True)], axis=1)
    c = gmax.shape[1] - k
    rows, cols = np.nonzero(x >= np.partition(gmax, c, axis=1)[:, c : c + 1])
    order = np.lexsort((cols, -x[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    keep = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left") < k
    return np.sort(cols[keep].reshape(r, k), axis=1)


def sort_desc(vals: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Per-row order of ``vals`` [n, k]: value desc, then ``key`` asc."""
    return np.lexsort((key, -vals), axis=-1)


def keep_topk(q: np.ndarray, s: np.ndarray, r: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Of (query, sim, row) triplets, the ``k`` best per query: highest sim, ties → smaller row.
    Returned sorted by query, then rank."""
    order = np.lexsort((r, -s, q))
    q, s, r = q[order], s[order], r[order]
    start = np.searchsorted(q, q, side="left")
    keep = np.arange(len(q)) - start < k
    return q[keep], s[keep], r[keep]


def block_topk(pool: Vectors | np.ndarray, queries: np.ndarray, k: int, candidates: np.ndarray | None = None,
               row0: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, cosine, global pool row) of the ``k`` best candidates of each query in ``pool``.

    ``pool`` is a block of whole shards whose first row is global row ``row0``; ``candidates`` a
    boolean mask over its rows (None = all); ``queries`` unit-norm float32.  Fewer than ``k``
    triplets for a query when the block holds fewer candidates.
    """
    pool = as_vectors(pool)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    best = [empty] * ((nq + QUERY_BATCH - 1) // QUERY_BATCH)
    if nq == 0 or k < 1:
        return empty
    qb = [queries[b : b + QUERY_BATCH] for b in range(0, nq, QUERY_BATCH)]
    for rows, block in pool.iter_blocks(CHUNK_ROWS):
        ok = np.ones(len(rows), bool) if candidates is None else np.asarray(candidates[rows], bool)
        n_ok = int(ok.sum())
        if n_ok == 0:
            continue
        block = np.ascontiguousarray(block, dtype=np.float32)
        bad = ~ok if n_ok < len(rows) else None
        kk = min(k, n_ok)
        for b, q in enumerate(qb):
            sims = similarities(q, block)
            if bad is not None:
                sims[:, bad] = -np.inf
            j = top_k(sims, kk)  # ties at the k-th value → smaller column = smaller pool row
            s = np.take_along_axis(sims, j, 1).reshape(-1)
            qi = np.repeat(np.arange(len(q), dtype=np.int64), j.shape[1])
            j = j.reshape(-1)
            pq_, ps, pr = best[b]
            best[b] = keep_topk(np.concatenate([pq_, qi + b * QUERY_BATCH]),
                                np.concatenate([ps, s]), np.concatenate([pr, rows[j] + row0]), k)
    return tuple(np.concatenate(parts) for parts in zip(*best))
