"""Duplicate edges from hashes: identical sha256 (exact copies) and close 64-bit perceptual hashes.

Perceptual-hash search is a pigeonhole multi-index: split the 64 bits into d+1 blocks; two hashes
within Hamming distance d agree exactly on at least one block, so only pairs sharing a block value
are compared.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd


def _empty_edges() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def exact_edges(keys) -> tuple[np.ndarray, np.ndarray]:
    """Edges linking every item to the first item with the same non-null key."""
    keys = pd.Series(keys, dtype=object)
    valid = keys.notna() & (keys.astype(str) != "")
    if not valid.any():
        return _empty_edges()
    rows = np.flatnonzero(valid.to_numpy())
    codes, _ = pd.factorize(keys[valid])
    first = pd.Series(rows).groupby(codes).transform("min").to_numpy()
    dup = first != rows
    return first[dup].astype(np.int64), rows[dup].astype(np.int64)


def hamming64(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(x.view(np.uint64), y.view(np.uint64))).astype(np.int64)


def phash_edges(phash: np.ndarray, valid: np.ndarray | None, max_distance: int,
                big_bucket: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Edges between items whose 64-bit hashes differ in ≤ ``max_distance`` bits."""
    phash = np.asarray(phash, dtype=np.int64)
    rows = np.arange(len(phash), dtype=np.int64) if valid is None else np.flatnonzero(valid)
    if len(rows) < 2:
        return _empty_edges()
    values = phash[rows]
    uniq, first_pos, inverse = np.unique(values, return_index=True, return_inverse=True)
    # identical hashes: link to the first row carrying that hash (cheap, handles huge groups)
    first_row = rows[first_pos]
    same = first_row[inverse] != rows
    ea, eb = [first_row[inverse][same]], [rows[same]]
    if max_distance > 0 and len(uniq) > 1:
        u = uniq.view(np.uint64)
        n_blocks = max_distance + 1
        bounds = np.linspace(0, 64, n_blocks + 1).astype(int)
        pairs_a, pairs_b = [], []
        for lo, hi in itertools.pairwise(bounds):
            key = (u >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
            order = np.argsort(key, kind="stable")
            ks = key[order]
            starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])
            sizes = np.diff(np.r_[starts, len(ks)])
            # small buckets: compare each element with the next o elements of its bucket
            small = np.repeat(sizes <= big_bucket, sizes)
            idx_small = order[small]
            ks_small = ks[small]
            for o in range(1, int(min(sizes.max(), big_bucket))):
                if o >= len(idx_small):
                    break
                same_key = ks_small[o:] == ks_small[:-o]
                if not same_key.any():
                    break
                i, j = idx_small[:-o][same_key], idx_small[o:][same_key]
                close = hamming64(uniq[i], uniq[j]) <= max_distance
                pairs_a.append(i[close])
                pairs_b.append(j[close])
            for s, size in zip(starts[sizes > big_bucket], sizes[sizes > big_bucket]):
                members = order[s : s + size]
                for c in range(0, size, 1024):  # chunked all-pairs for rare huge buckets
                    blk = members[c : c + 1024]
                    d = np.bitwise_count(uniq[blk, None].view(np.uint64) ^ uniq[None, members].view(np.uint64))
                    bi, bj = np.nonzero(d <= max_distance)
                    keep = blk[bi] < members[bj]
                    pairs_a.append(blk[bi][keep])
                    pairs_b.append(members[bj][keep])
        if pairs_a:
            # a close pair usually agrees on several blocks: keep each pair once
            both = np.unique(np.stack([np.concatenate(pairs_a), np.concatenate(pairs_b)], 1), axis=0)
            pa_, pb_ = both[:, 0], both[:, 1]
            ea.append(first_row[pa_])
            eb.append(first_row[pb_])
    a, b = np.concatenate(ea).astype(np.int64), np.concatenate(eb).astype(np.int64)
    return np.minimum(a, b), np.maximum(a, b)
