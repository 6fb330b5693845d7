"""GEMM-blocked IVF (the CPU index for large N): inverted lists scanned by dense float32 GEMMs."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from curation.index_plan import IndexConfig, IndexPlan
from curation.kmeans import kmeans_array, sample_rows
from curation.store import Vectors, as_vectors
from curation.topk import select_k, similarities, sort_desc, top_k

log = logging.getLogger(__name__)

PAIR_BLOCK = 1024  # queries per list GEMM: a cache-sized score block (PAIR_BLOCK × list size float32)
_MISSING = np.iinfo(np.int64).max  # row of an empty top-k slot: sorts after every real row


def _merge(best_s: np.ndarray, best_r: np.ndarray, filled: np.ndarray, qi: np.ndarray,
           cand_s: np.ndarray, cand_r: np.ndarray) -> None:
    """Fold one list's candidates (``cand_*`` [len(qi), ≤ k]) into the running top-k (unordered) of
    queries ``qi`` under (similarity desc, row asc)."""
    kk = best_s.shape[1]
    first = ~filled[qi]
    if first.any():
        q, m = qi[first], cand_s.shape[1]
        best_s[q, :m], best_r[q, :m] = cand_s[first], cand_r[first]
        filled[q] = True
        if first.all():
            return
        keep = ~first
        qi, cand_s, cand_r = qi[keep], cand_s[keep], cand_r[keep]
    # a list whose best candidate is below a query's k-th cannot change it (>=: a tie may, by row)
    useful = cand_s.max(1) >= best_s[qi].min(1)
    if not useful.all():
        qi, cand_s, cand_r = qi[useful], cand_s[useful], cand_r[useful]
    if len(qi) == 0:
        return
    s = np.concatenate([best_s[qi], cand_s], 1)
    r = np.concatenate([best_r[qi], cand_r], 1)
    j = select_k(s, kk, key=lambda rows: r[rows])
    best_s[qi] = np.take_along_axis(s, j, 1)
    best_r[qi] = np.take_along_axis(r, j, 1)


class CoarseQuantizer:
    """Nearest IVF centroids by one matrix product + top-k (numpy float32 GEMM, partition top-k).

    Faster than FAISS's flat search on CPU (bench/RESULTS.md), and coarse quantization
    dominates IVF add and search once lists are short.  Probes are sorted by similarity desc,
    ties → smaller centroid id.
    """

    def __init__(self, centroids: np.ndarray, batch: int = 2048):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.batch = batch

    def search(self, x: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        nprobe = min(nprobe, self.centroids.shape[0])
        dq = np.empty((len(x), nprobe), np.float32)
        iq = np.empty((len(x), nprobe), np.int64)
        for s in range(0, len(x), self.batch):
            sims = similarities(x[s : s + self.batch], self.centroids)
            i = top_k(sims, nprobe)
            v = np.take_along_axis(sims, i, 1)
            o = sort_desc(v, i)
            dq[s : s + len(v)] = np.take_along_axis(v, o, 1)
            iq[s : s + len(v)] = np.take_along_axis(i, o, 1)
        return dq, iq


def train_centroids(vectors: Vectors, rows: np.ndarray, plan: IndexPlan, cfg: IndexConfig) -> np.ndarray:
    """The ``nlist`` IVF centroids, k-means on a seeded sample of ``rows`` (gathered and sharded dedup)."""
    train = vectors.gather(sample_rows(rows, plan.n_train, cfg.seed))
    return kmeans_array(train, plan.nlist, niter=cfg.kmeans_niter, seed=cfg.seed,
                        max_points_per_centroid=cfg.gemm_train_per_centroid,
                        two_level_min_k=cfg.two_level_min_nlist)


class GemmIvfIndex:
    """IVF whose list scans are dense float32 GEMMs instead of FAISS's per-query loops.

    Build: spherical k-means on a sample → ``nlist`` centroids; one GEMM pass over the
    memmaps gives every row its ``nprobe`` nearest centroids; the rows are then copied
    into one float32 array sorted by nearest centroid (each list is a contiguous slice).
    Search of a query block: group the (query, probed list) pairs by list, score each
    list's queries × members with one GEMM, keep a top-k per (query, probe slot), then
    one top-k over the slots.  Cost ≈ Q·nprobe·list_size·D, i.e. linear in N at a
    fixed list size, and runs at BLAS speed (FAISS's IVF-Flat scan does not; bench/RESULTS.md).
    The self-search (``search_vectors`` over the indexed rows) walks queries in list
    order, so a block's queries share their lists and the GEMMs are large.
    Results are sorted by (similarity desc, row asc), so equal scores break by row id.
    """

    def __init__(self, centroids: np.ndarray, lists: ListStore, bounds: np.ndarray, plan: IndexPlan,
                 cfg: IndexConfig, source: Vectors | None, mask: np.ndarray | None):
        self.coarse = CoarseQuantizer(centroids)
        self.lists = lists  # the rows in list order, in memory or in the assign pieces on disk
        self.bounds = bounds  # list c = sorted positions bounds[c]:bounds[c+1]
        if plan.query_batch < 1:  # plan_index sets it for every ivf_gemm plan; a hand-made plan must too
            raise ValueError(f"ivf_gemm plan without a query batch: {plan}")
        self.plan = plan
        self.cfg = cfg
        self._source = source
        self._mask = mask

    @property
    def ntotal(self) -> int:
        return int(self.bounds[-1])

    @classmethod
    def build(cls, vectors: Vectors, rows: np.ndarray, plan: IndexPlan, cfg: IndexConfig,
              mask: np.ndarray | None) -> GemmIvfIndex:
        n, d = len(rows), vectors.dim
        centroids = train_centroids(vectors, rows, plan, cfg)
        coarse = CoarseQuantizer(centroids)
        probes = np.empty((n, plan.nprobe), np.int32)
        labels = np.empty(n, np.int64)
        batch = cfg.search_batch * 4
        for grows, block in vectors.iter_blocks(batch, mask):
            pos = np.searchsorted(rows, grows)  # global row -> index position
            _, iq = coarse.search(block, plan.nprobe)
            probes[pos] = iq
            labels[pos] = iq[:, 0]
        order = np.argsort(labels, kind="stable")  # by list, then by row: deterministic
        sorted_pos = np.empty(n, np.int64)
        sorted_pos[order] = np.arange(n)
        db = np.empty((n, d), np.float32)
        for grows, block in vectors.iter_blocks(batch, mask):
            db[sorted_pos[np.searchsorted(rows, grows)]] = block
        bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=plan.nlist))]).astype(np.int64)
        log.info("built ivf_gemm index over %d vectors (nlist=%d, nprobe=%d, largest list %d)",
                 n, plan.nlist, plan.nprobe, int(np.diff(bounds).max()) if n else 0)
        return cls(centroids, MemoryLists(db, order, probes, rows), bounds, plan, cfg, vectors, mask)

    def _search(self, xq: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the probed lists for float32 queries ``xq`` [q, D].

        Each probed list is read once per call and scored against all of its queries (in blocks of
        ``PAIR_BLOCK``); a query's running top-k is merged with each list's.  Exact under the order
        (similarity desc, global row asc), which is strict (a row lies in one list only), so the
        merge order does not matter; a list's members lie in row order, so its own top-k keeps the
        smaller rows on ties.  Memory is O(q · k), not O(q · nprobe · k): the query batch can be large,
        and the lists are read ``N / batch`` times in a whole self-search.
        """
        q, p = probes.shape
        kk = min(k, self.ntotal)
        best_s = np.full((q, kk), -np.inf, np.float32)
        best_r = np.full((q, kk), _MISSING, np.int64)
        filled = np.zeros(q, bool)  # queries with a merged list: the first list is copied, not merged
        flat = probes.reshape(-1).astype(np.int64)
        by_list = np.argsort(flat, kind="stable")
        lists, starts = np.unique(flat[by_list], return_index=True)
        ends = np.append(starts[1:], len(flat))
        for c, a, b in zip(lists.tolist(), starts.tolist(), ends.tolist()):
            lo, hi = int(self.bounds[c]), int(self.bounds[c + 1])
            if hi == lo:
                continue
            members, rows = self.lists.members(c, lo, hi)
            queries = by_list[a:b] // p  # distinct: a query probes a list once
            for s in range(0, len(queries), PAIR_BLOCK):
                qi = queries[s : s + PAIR_BLOCK]
                scores = similarities(xq[qi], members)
                j = select_k(scores, kk)  # all members when the list is short
                _merge(best_s, best_r, filled, qi, np.take_along_axis(scores, j, 1), rows[j])
        o = sort_desc(best_s, best_r)  # similarity desc, then row asc; empty slots last
        best_s, best_r = np.take_along_axis(best_s, o, 1), np.take_along_axis(best_r, o, 1)
        del o
        best_r[best_r == _MISSING] = -1  # empty slots keep -inf
        if kk == k:
            return best_s, best_r
        out_s = np.full((q, k), -np.inf, np.float32)
        out_r = np.full((q, k), -1, np.int64)
        out_s[:, :kk], out_r[:, :kk] = best_s, best_r
        return out_s, out_r

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(sims [q, k] float32, global rows [q, k] int64; -1 / -inf where fewer than k found)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ntotal == 0 or len(q) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        out_s, out_r = [], []
        for s in range(0, len(q), self.plan.query_batch):
            qb = q[s : s + self.plan.query_batch]
            _, iq = self.coarse.search(qb, self.plan.nprobe)
            a, b = self._search(qb, iq.astype(np.int32), k)
            out_s.append(a)
            out_r.append(b)
        return np.concatenate(out_s), np.concatenate(out_r)

    def _is_self(self, vectors: Vectors, mask: np.ndarray | None) -> bool:
        if vectors is not self._source:
            return False
        if mask is None or self._mask is None:
            return mask is None and self._mask is None
        return mask is self._mask or np.array_equal(mask, self._mask)

    def search_vectors(self, vectors: Vectors | np.ndarray, k: int, mask: np.ndarray | None = None,
                       desc: str = "search") -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Query with every (masked) row of ``vectors`` in blocks → (query rows, sims, nbr rows).

        Self-search yields blocks in list order (rows of one list together); callers
        index results by the query rows, never by position.
        """
        vectors = as_vectors(vectors)
        if not self._is_self(vectors, mask):
            for qrows, block in vectors.iter_blocks(self.cfg.search_batch, mask):
                sims, nbrs = self.search(block, k)
                yield qrows, sims, nbrs
            return
        yield from self.search_sorted(0, self.ntotal, k, desc)

    def search_sorted(self, start: int, stop: int, k: int, desc: str = "search"
                      ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Self-search of the indexed rows at sorted (list-order) positions ``start:stop``.

        Blocks start at multiples of the plan's ``query_batch`` counted from 0, so a range split
        at batch boundaries (the sharded dedup's tasks) runs exactly the GEMMs of the
        whole self-search: same queries, same lists, bit-identical results.
        """
        bs = self.plan.query_batch
        bar = tqdm(total=stop - start, desc=desc, leave=False, disable=stop - start < 200_000)
        for s in range(start, stop, bs):
            xq, probes, qrows = self.lists.queries(s, min(s + bs, stop))
            sims, nbrs = self._search(xq, probes, k)
            if bar is not None:
                bar.update(len(qrows))
            yield qrows, sims, nbrs
        if bar is not None:
            bar.close()


class ListStore(Protocol):
    """The indexed rows in list order (sorted position = list, then global row)."""

    def members(self, c: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(float32 array [hi - lo, D], global rows [hi - lo] int64) of list ``c`` (sorted positions lo:hi)."""
        ...

    def queries(self, start: int, stop: int):
        """(float32 array [q, D], probes [q, nprobe] int32, global rows [q]) at sorted positions start:stop."""
        ...


class MemoryLists:
    """The gathered job's store: one float32 array of every row, sorted by list."""

    def __init__(self, db: np.ndarray, order: np.ndarray, probes: np.ndarray, rows: np.ndarray):
        self.db = db
        self.order = order  # sorted position -> index position
        self.probes = probes  # [n, nprobe] int32 lists probed by each indexed row (index position)
        self.rows = rows  # index position -> global row

    def members(self, c: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        return self.db[lo:hi], self.rows[self.order[lo:hi]]

    def queries(self, start: int, stop: int):
        pos = self.order[start:stop]
        return self.db[start:stop], self.probes[pos], self.rows[pos]
