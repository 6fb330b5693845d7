"""Read the embed stage's outputs (``OUT/embed/<source>/<shard_id>.{parquet,<embedder>.npy}``).

Embeddings stay on disk: each shard's float16 matrix is memory-mapped
(``np.load(mmap_mode="r")``) and handed out in float32 blocks, so search and
k-means read the pool shard by shard instead of loading it whole.  Rows are
numbered globally in (sorted shard id, ``emb_row``) order; that "global index" is
what indexes, edges and decisions use internally, and ``ids[i]`` maps it back.

A shard with inconsistent files (missing or mis-sized ``.npy``, gaps in
``emb_row``) is skipped with a warning and recorded in ``problems`` rather than
failing the whole stage.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import layout

log = logging.getLogger(__name__)

# Metadata columns the search stages need (others stay on disk).
META_COLUMNS = ("id", "source", "shard_id", "sha256", "phash", "width", "height", "emb_row")


class StoreError(RuntimeError):
    """The embed outputs cannot be used at all (e.g. no folder, mixed dimensions)."""


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy with unit L2 rows (zero rows stay zero); inner product = cosine."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    x = np.array(x, dtype=np.float32, copy=True, order="C")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class Vectors(Protocol):
    """Row-addressable vectors that may live on disk (see ShardedVectors / ArrayVectors)."""

    n: int
    dim: int

    def iter_blocks(self, block_rows: int = ..., mask: np.ndarray | None = ...) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        ...

    def gather(self, rows: np.ndarray) -> np.ndarray:
        ...


class ArrayVectors:
    """In-memory vectors with the same interface as ShardedVectors (tests, small sets)."""

    def __init__(self, x: np.ndarray):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected [N, D] vectors, got shape {x.shape}")
        self._x = x
        self.n, self.dim = int(x.shape[0]), int(x.shape[1])

    def iter_blocks(self, block_rows: int = 65536, mask: np.ndarray | None = None):
        rows_all = np.arange(self.n, dtype=np.int64) if mask is None else np.flatnonzero(mask).astype(np.int64)
        for s in range(0, len(rows_all), block_rows):
            rows = rows_all[s : s + block_rows]
            yield rows, normalize_rows(self._x[rows])

    def gather(self, rows: np.ndarray) -> np.ndarray:
        return normalize_rows(self._x[np.asarray(rows, dtype=np.int64)])

    def load_all(self, mask: np.ndarray | None = None) -> np.ndarray:
        return normalize_rows(self._x if mask is None else self._x[mask])


def as_vectors(v: Vectors | np.ndarray) -> Vectors:
    """In-memory arrays wrapped as Vectors; Vectors pass through."""
    return ArrayVectors(v) if isinstance(v, np.ndarray) else v


class ShardedVectors:
    """Concatenation of memory-mapped ``.npy`` shards, addressed by global row."""

    def __init__(self, paths: Sequence[str | Path], counts: Sequence[int] | None = None, dim: int | None = None,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None):
        """``dim``: of the stored rows; ``transform``: raw rows → the float32 unit rows handed out
        (default :func:`normalize_rows`; the copy-detection stages pass the pool's whitening,
        curation/whiten.py), row by row, so ``dim`` is then the transform's output dimension."""
        self.paths = [Path(p) for p in paths]
        self.transform = transform
        self._mmaps: list[np.ndarray | None] = [None] * len(self.paths)
        if counts is None:
            counts = []
            for i, _ in enumerate(self.paths):
                counts.append(int(self._mmap(i).shape[0]))
        self.counts = np.asarray(counts, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.n = int(self.offsets[-1])
        if dim is None:
            dims = {int(self._mmap(i).shape[1]) for i in range(len(self.paths)) if self.counts[i] > 0}
            if len(dims) > 1:
                raise StoreError(f"embedding shards have different dimensions {sorted(dims)}")
            dim = dims.pop() if dims else 0
        self.raw_dim = int(dim)
        self.dim = int(getattr(transform, "dim", dim)) if transform is not None else self.raw_dim

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Stored rows → the float32 unit rows the stages compare."""
        return normalize_rows(raw) if self.transform is None else self.transform(raw)

    def _mmap(self, i: int) -> np.ndarray:
        m = self._mmaps[i]
        if m is None:
            m = np.load(self.paths[i], mmap_mode="r", allow_pickle=False)
            self._mmaps[i] = m
        return m

    def iter_blocks(self, block_rows: int = 65536, mask: np.ndarray | None = None):
        """Yield ``(global_rows, float32 normalised block)`` shard by shard."""
        for i in range(len(self.paths)):
            lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
            if hi == lo:
                continue
            local = np.arange(hi - lo, dtype=np.int64) if mask is None else np.flatnonzero(mask[lo:hi])
            if len(local) == 0:
                continue
            m = self._mmap(i)
            for s in range(0, len(local), block_rows):
                sel = local[s : s + block_rows]
                contiguous = sel[-1] - sel[0] + 1 == len(sel)
                block = m[sel[0] : sel[-1] + 1] if contiguous else m[sel]
                yield sel + lo, self.prepare(block)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """Vectors at arbitrary global rows (any order), float32 normalised."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.raw_dim), dtype=np.float32)
        if len(rows) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError("row out of range")
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        order = np.argsort(shard, kind="stable")
        for i in np.unique(shard):
            pos = order[np.searchsorted(shard[order], i) : np.searchsorted(shard[order], i, side="right")]
            out[pos] = self._read_rows(int(i), rows[pos] - self.offsets[i])
        return self.prepare(out)

    def _read_rows(self, i: int, local: np.ndarray, gap: int = 8, max_run: int = 4096) -> np.ndarray:
        """Stored rows ``local`` of shard ``i`` by positioned reads of runs of nearby rows.

        Not through the memory map: a random sample touches (and read-ahead maps) most pages of
        every shard, which then count as this process's resident memory (the sharded dedup's
        train and search tasks sample or re-score rows anywhere in the pool).
        """
        import os

        m = self._mmap(i)  # header, dtype and shape checked by np.load
        if not isinstance(m, np.memmap) or m.ndim != 2 or not m.flags.c_contiguous:
            return np.asarray(m[local])
        uniq, inv = np.unique(local, return_inverse=True)
        row_bytes = m.shape[1] * m.dtype.itemsize
        got = np.empty((len(uniq), m.shape[1]), m.dtype)
        starts = np.flatnonzero(np.diff(uniq, prepend=-(gap + 1)) > gap)
        fd = os.open(self.paths[i], os.O_RDONLY)
        try:
            bounds = np.append(starts, len(uniq)).tolist()
            for a, b in zip(bounds[:-1], bounds[1:]):
                for c in range(a, b, max_run):  # a run of at most max_run wanted rows per read
                    d = min(b, c + max_run)
                    lo, hi = int(uniq[c]), int(uniq[d - 1]) + 1
                    buf = os.pread(fd, (hi - lo) * row_bytes, m.offset + lo * row_bytes)
                    if len(buf) != (hi - lo) * row_bytes:
                        raise StoreError(f"{self.paths[i]}: short read (file truncated?)")
                    got[c:d] = np.frombuffer(buf, m.dtype).reshape(hi - lo, -1)[uniq[c:d] - lo]
        finally:
            os.close(fd)
        return got[inv.reshape(-1)]

    def load_all(self, mask: np.ndarray | None = None) -> np.ndarray:
        parts = [b for _, b in self.iter_blocks(mask=mask)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


@dataclass
class ShardProblem:
    source: str
    shard_id: str
    reason: str


list_sources = layout.sources  # kept under the name the stages use


class EmbeddingStore:
    """Embeddings + metadata of the ``status == "ok"`` rows of one or more sources.

    ``meta`` is a DataFrame (one row per global index) with META_COLUMNS; ``ids``
    the id column as a numpy object array; ``vectors`` a ShardedVectors.
    """

    def __init__(self, out_dir: str | Path, sources: str | Sequence[str], embedder: str,
                 transform: Callable[[np.ndarray], np.ndarray] | None = None):
        """``transform``: see :class:`ShardedVectors` (the pool's whitening for copy detection)."""
        self.out_dir = Path(out_dir)
        self.sources = [sources] if isinstance(sources, str) else list(sources)
        self.embedder = embedder
        self.problems: list[ShardProblem] = []
        npy_paths: list[Path] = []
        counts: list[int] = []
        metas: list[pd.DataFrame] = []
        dims: set[int] = set()
        for source in self.sources:
            folder = layout.embed_dir(self.out_dir, source)
            if not folder.is_dir():
                raise StoreError(f"no embed outputs for source '{source}' (missing folder {folder})")
            for shard_id, pq_path in layout.embed_shards(self.out_dir, source):
                npy = layout.embed_npy(self.out_dir, source, shard_id, embedder)
                loaded = self._load_shard(source, shard_id, pq_path, npy)
                if loaded is None:
                    continue
                meta, npy, n_ok, dim = loaded
                metas.append(meta)
                if n_ok:
                    npy_paths.append(npy)
                    counts.append(n_ok)
                    dims.add(dim)
        if len(dims) > 1:
            raise StoreError(f"embedder '{embedder}' shards have different dimensions {sorted(dims)}")
        self.meta = (
            pd.concat(metas, ignore_index=True) if metas else pd.DataFrame({c: [] for c in META_COLUMNS})
        )
        self.ids = self.meta["id"].to_numpy(dtype=object)
        self.vectors = ShardedVectors(npy_paths, counts, dims.pop() if dims else 0, transform)
        assert self.vectors.n == len(self.meta)
        self.n = self.vectors.n
        self.dim = self.vectors.dim

    def _load_shard(self, source: str, shard_id: str, pq_path: Path, npy_path: Path):
        def skip(reason: str):
            log.warning("skipping embed shard %s/%s: %s", source, shard_id, reason)
            self.problems.append(ShardProblem(source, shard_id, reason))

        try:
            table = pq.read_table(pq_path)
        except Exception as exc:  # noqa: BLE001 - unreadable parquet: skip the shard, keep the job alive
            return skip(f"unreadable parquet ({type(exc).__name__}: {exc})")
        missing = [c for c in ("id", "status", "emb_row") if c not in table.column_names]
        if missing:
            return skip(f"parquet lacks columns {missing}")
        table = table.filter(pc.equal(table["status"], "ok"))
        cols = [c for c in META_COLUMNS if c in table.column_names]
        meta = table.select(cols).to_pandas()
        for c in META_COLUMNS:
            if c not in meta.columns:
                meta[c] = None
        meta = meta.sort_values("emb_row", kind="stable").reset_index(drop=True)[list(META_COLUMNS)]
        n_ok = len(meta)
        if not np.array_equal(meta["emb_row"].to_numpy(dtype=np.int64), np.arange(n_ok)):
            return skip("emb_row of ok rows is not 0..n_ok-1")
        if n_ok == 0:
            return meta, npy_path, 0, 0
        if not npy_path.is_file():
            return skip(f"missing embeddings file {npy_path.name}")
        try:
            arr = np.load(npy_path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any unreadable .npy: skip the shard
            return skip(f"unreadable embeddings ({type(exc).__name__}: {exc})")
        if arr.ndim != 2 or arr.shape[0] != n_ok:
            return skip(f"embeddings shape {arr.shape} does not match {n_ok} ok rows")
        return meta, npy_path, n_ok, int(arr.shape[1])

    def __len__(self) -> int:
        return self.n


def resolve_embedder(out_dir: str | Path, source: str, name: str = "") -> str:
    """``name`` if given, else the single embedder whose ``.npy`` files exist for ``source``."""
    if name:
        return name
    found = layout.embedders_present(out_dir, source)
    if len(found) != 1:
        raise StoreError(
            f"cannot infer the embedder for source '{source}': found {sorted(found) or 'none'}; "
            "set the stage's 'embedder' option"
        )
    return found.pop()
