"""Exact k nearest candidates of every query, computed so that any split of the pool gives the same bits.

Sample-based retrieval (curation/retrieve.py) and its sharded form (curation/retrieve_sharded.py)
both call :func:`block_topk`.  The pool is read in chunks of ``CHUNK_ROWS`` rows at fixed offsets
inside each embed shard (``iter_blocks`` without a mask) and the queries in batches of
``QUERY_BATCH`` rows, so a similarity is always the product of the same two GEMM operands, whichever
block of whole shards a task holds.  Non-candidates are masked after the GEMM (masking before would
change the operand shapes).  Ties are broken by the smaller pool row, which makes the top-k a total
order: per-block top-k lists merged with :func:`keep_topk` equal the top-k of the whole pool.
"""
from __future__ import annotations

import numpy as np

from curation.store import Vectors, as_vectors

CHUNK_ROWS = 8192  # pool rows per GEMM (fixed offsets inside each shard)
QUERY_BATCH = 2048  # query rows per GEMM: a 2048 × 8192 float32 similarity block is 64 MiB


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
    import torch

    pool = as_vectors(pool)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    nq = len(queries)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64))
    best = [empty] * ((nq + QUERY_BATCH - 1) // QUERY_BATCH)
    if nq == 0 or k < 1:
        return empty
    qt = [torch.from_numpy(queries[b : b + QUERY_BATCH]) for b in range(0, nq, QUERY_BATCH)]
    for rows, block in pool.iter_blocks(CHUNK_ROWS):
        ok = np.ones(len(rows), bool) if candidates is None else np.asarray(candidates[rows], bool)
        n_ok = int(ok.sum())
        if n_ok == 0:
            continue
        xt = torch.from_numpy(block)
        bad = torch.from_numpy(~ok) if n_ok < len(rows) else None
        kk = min(k, n_ok)
        for b, q in enumerate(qt):
            sims = torch.mm(q, xt.T)
            if bad is not None:
                sims[:, bad] = -np.inf
            vals, idx = torch.topk(sims, kk, dim=1)
            # the k-th value is a candidate's (finite); more entries reaching it than topk returned
            # means a tie at the boundary, resolved by row below rather than by topk's order
            reach = sims >= vals[:, -1:]
            if int(reach.sum()) == vals.numel():
                qi = torch.arange(len(q)).repeat_interleave(kk)
                j, s = idx.reshape(-1), vals.reshape(-1).numpy()
            else:
                qi, j = torch.nonzero(reach, as_tuple=True)
                s = sims[qi, j].numpy()
            qi, j = qi.numpy(), j.numpy()
            pq_, ps, pr = best[b]
            best[b] = keep_topk(np.concatenate([pq_, qi.astype(np.int64) + b * QUERY_BATCH]),
                                np.concatenate([ps, s]), np.concatenate([pr, rows[j] + row0]), k)
    return tuple(np.concatenate(parts) for parts in zip(*best))
