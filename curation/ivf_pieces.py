"""IVF lists on disk for the sharded dedup: each assign task's rows sorted by list ("pieces").

Assign task ``b`` (a block of whole embed shards, rows ``row0..``) writes its rows in list order
(nearest centroid, then global row) with their probed lists and per-list counts.  List ``c`` of the
whole pool is then the concatenation, in block order, of every piece's list-``c`` slice, which is
exactly the gathered index's list order (stable sort by list over ascending rows).  Readers use
positioned reads, not memory maps, so a task's resident memory is what it is working on, not the
pages of every piece it has touched.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from curation import layout
from curation.gemm_ivf import CoarseQuantizer
from curation.store import ShardedVectors, normalize_rows
from dinov2.utils.io import atomic_save_npy

PARTS = ("vec", "rows", "probes", "counts")  # counts last: its presence marks the piece done


def assign_block(vectors: ShardedVectors, row0: int, centroids: np.ndarray, nprobe: int, batch: int):
    """(fp16 vectors, global rows, probes int32, per-list counts) of one block, in list order.

    ``vectors`` are the block's own shards; they are read in the same ``iter_blocks`` chunks as the
    gathered index build, so every row gets bit-identical probes.
    """
    coarse = CoarseQuantizer(centroids)
    n = vectors.n
    probes = np.empty((n, nprobe), np.int32)
    for rows, block in vectors.iter_blocks(batch):
        probes[rows] = coarse.search(block, nprobe)[1]
    order = np.argsort(probes[:, 0], kind="stable")
    slot = np.empty(n, np.int64)  # row -> its position in list order: rows are copied there directly
    slot[order] = np.arange(n)
    if vectors.transform is not None:  # whitened: the prepared float32 rows the gathered index holds
        vec = np.empty((n, vectors.dim), np.float32)
        for rows, block in vectors.iter_blocks(batch):
            vec[slot[rows]] = block
    else:  # the stored float16 rows (half the bytes), normalised when read
        vec = np.empty((n, vectors.dim), np.float16)
        for i, path in enumerate(vectors.paths):
            lo, hi = int(vectors.offsets[i]), int(vectors.offsets[i + 1])
            vec[slot[lo:hi]] = np.load(path, mmap_mode="r", allow_pickle=False)[: hi - lo]
    counts = np.bincount(probes[:, 0], minlength=len(centroids)).astype(np.int64)
    return vec, order.astype(np.int64) + row0, probes[order], counts


def write_piece(out_dir: str | Path, block: int, arrays) -> None:
    for part, arr in zip(PARTS, arrays):
        atomic_save_npy(layout.dedup_piece(out_dir, block, part), arr)


def piece_done(out_dir: str | Path, block: int) -> bool:
    return all(layout.dedup_piece(out_dir, block, p).is_file() for p in PARTS)


class NpyRows:
    """Rows ``lo:hi`` of a ``.npy`` file by positioned reads (no memory map)."""

    def __init__(self, path: str | Path):
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        self.shape, self.dtype = shape, dtype
        self.row_shape = shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)
        self.bytes_read = 0

    def read(self, lo: int, hi: int) -> np.ndarray:
        nbytes = (hi - lo) * self.row_bytes
        buf = os.pread(self.fd, nbytes, self.offset + lo * self.row_bytes)
        if len(buf) != nbytes:
            raise OSError(f"short read from a piece ({len(buf)} of {nbytes} bytes): truncated file?")
        self.bytes_read += nbytes
        return np.frombuffer(buf, self.dtype).reshape((hi - lo, *self.row_shape))

    def close(self) -> None:
        os.close(self.fd)


class DiskLists:
    """A :class:`~curation.gemm_ivf.ListStore` over every assign task's piece."""

    def __init__(self, out_dir: str | Path, n_blocks: int, prepared: bool = False):
        """``prepared``: the pieces hold the stage's float32 vectors already (whitened pools)."""
        self.prepared = prepared
        counts = np.stack([np.load(layout.dedup_piece(out_dir, b, "counts")) for b in range(n_blocks)])
        self.nlist = counts.shape[1]
        # piece_cum[b, c]: rank in list c where piece b's members start; offsets[b, c]: where they lie in piece b
        self.piece_cum = np.vstack([np.zeros((1, self.nlist), np.int64), np.cumsum(counts, axis=0)])
        self.offsets = np.cumsum(counts, axis=1) - counts
        self.bounds = np.concatenate([[0], np.cumsum(counts.sum(0))]).astype(np.int64)
        self.files = {p: [NpyRows(layout.dedup_piece(out_dir, b, p)) for b in range(n_blocks)]
                      for p in ("vec", "rows", "probes")}

    def _read(self, start: int, stop: int, parts: tuple[str, ...]) -> list[np.ndarray]:
        got: dict[str, list[np.ndarray]] = {p: [] for p in parts}
        c_lo = int(np.searchsorted(self.bounds, start, "right")) - 1
        c_hi = int(np.searchsorted(self.bounds, stop - 1, "right")) - 1
        for c in range(c_lo, c_hi + 1):
            r0 = max(start, int(self.bounds[c])) - int(self.bounds[c])
            r1 = min(stop, int(self.bounds[c + 1])) - int(self.bounds[c])
            lo = np.maximum(self.piece_cum[:-1, c], r0)
            hi = np.minimum(self.piece_cum[1:, c], r1)
            for b in np.flatnonzero(hi > lo).tolist():
                first = int(self.offsets[b, c] + lo[b] - self.piece_cum[b, c])
                for p in parts:
                    got[p].append(self.files[p][b].read(first, first + int(hi[b] - lo[b])))
        return [np.concatenate(got[p]) for p in parts]

    def members(self, c: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        vec, rows = self._read(lo, hi, ("vec", "rows"))
        return self._prepare(vec), rows

    def _prepare(self, vec: np.ndarray) -> np.ndarray:
        return np.array(vec, np.float32) if self.prepared else normalize_rows(vec)

    def queries(self, start: int, stop: int):
        vec, rows, probes = self._read(start, stop, ("vec", "rows", "probes"))
        return self._prepare(vec), probes, rows

    @property
    def bytes_read(self) -> int:
        return sum(f.bytes_read for files in self.files.values() for f in files)

    def close(self) -> None:
        for files in self.files.values():
            for f in files:
                f.close()
