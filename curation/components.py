"""Connected components of an edge list: the array union-find dedup groups images with."""
from __future__ import annotations

import numpy as np


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label per node = smallest node index in its component.

    Array union-find: repeatedly hook the larger root under the smaller one
    (``parent`` only ever decreases, so no cycles) and compress paths by pointer
    jumping.  The result is a pure function of the edge *set*.
    """
    parent = np.arange(n, dtype=np.int64)
    union_edges(parent, a, b)
    return parent


def union_edges(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Merge the edges ``a[i]–b[i]`` into the union-find ``parent`` in place (then fully compressed).

    Applying edge sets one after another gives the same labels as applying their union at once,
    which is what lets the sharded dedup stream its edge shards.
    """
    n = len(parent)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    if len(a) != len(b):
        raise ValueError("edge arrays differ in length")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= n):
        raise ValueError("edge endpoint out of range")

    def compress() -> None:
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                return
            parent[:] = grand

    while len(a):
        ra, rb = parent[a], parent[b]
        live = ra != rb
        if not live.any():
            break
        a, b, ra, rb = a[live], b[live], ra[live], rb[live]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        compress()
    compress()


def spanning_forest(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges ``node → component label`` with the same connectivity as ``a–b`` (one per non-root node).

    A map task reduces its up-to-k-per-row edges to at most one per endpoint before writing them.
    """
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    labels = connected_components(len(nodes), inv[: len(a)], inv[len(a):])
    child = labels != np.arange(len(nodes))
    return nodes[child], nodes[labels[child]]
