"""Embed stage: decode every input item once, hash it, and embed it with each embedder.

Per shard (one expanded input) the stage writes, atomically::

    OUT/embed/<source>/<shard_id>.<embedder>.npy   float16 [n_ok, D], L2-normalised
    OUT/embed/<source>/<shard_id>.parquet          one row per item (EMBED_SCHEMA), written LAST

so "the parquet exists" means "the shard is complete"; finished shards are skipped
on rerun and a killed job resumes where it stopped with identical results (item
order, batch composition and numerics are all functions of the input alone).

Decoding runs in a thread pool (PIL and torch release the GIL) a bounded window
ahead of the model, so decoding overlaps inference instead of starving it.

The models themselves are :mod:`curation.embedders`.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from curation import layout
from curation.embedders import Embedder, EmbedderConfig, load_embedders
from curation.ingest import DEFAULT_MAX_BYTES, InputReader, Item, expand_inputs
from curation.phash import phash
from curation.text import raw_path_bytes, safe_text
from dinov2.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from dinov2.utils.io import atomic_save_npy, atomic_write_parquet

log = logging.getLogger(__name__)

SOURCE_RE = re.compile(r"^(pool|eval-[A-Za-z0-9_.-]+|query-[A-Za-z0-9_.-]+)$")
EMBEDDER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ADDRESS_RE = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

EMBED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("shard_id", pa.string()),
        ("input_path", pa.string()),
        ("member", pa.string()),
        ("key", pa.string()),
        ("ext", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("orig_mode", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("emb_row", pa.int64()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
        # The file system bytes of input_path when that text had to be escaped (else null).
        ("input_path_bytes", pa.binary()),
    ]
)


# ----------------------------------------------------------------------------- shard processing
@dataclass
class ShardStats:
    source: str
    shard_id: str
    input_path: str
    n_items: int = 0
    n_ok: int = 0
    n_error: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    skipped: bool = False  # already complete from an earlier run
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else 0.0


@dataclass
class StageStats:
    source: str
    task_index: int
    num_tasks: int
    shards: list[ShardStats] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return sum(s.n_ok for s in self.shards)

    @property
    def n_error(self) -> int:
        return sum(s.n_error for s in self.shards)

    @property
    def reasons(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.reasons)
        return dict(sorted(total.items()))


@dataclass
class _Processed:
    item: Item
    sha256: str | None = None
    phash: int | None = None
    width: int | None = None
    height: int | None = None
    orig_mode: str | None = None
    tensors: dict[tuple, torch.Tensor] | None = None


def shard_paths(out_dir: str | Path, source: str, shard_id: str, embedder_names: Sequence[str]):
    return (layout.embed_parquet(out_dir, source, shard_id),
            {n: layout.embed_npy(out_dir, source, shard_id, n) for n in embedder_names})


def shard_done(out_dir: str | Path, source: str, shard_id: str, embedder_names: Sequence[str]) -> bool:
    """The shard's Parquet and every embedder's matrix are there (one lost file → embed again)."""
    parquet, npys = shard_paths(out_dir, source, shard_id, embedder_names)
    return parquet.is_file() and all(p.is_file() for p in npys.values())


def _process(item: Item, reader: InputReader, preps: dict[tuple, Callable], max_pixels: int) -> _Processed:
    """Worker-thread part: read, hash, decode, preprocess.  Never raises."""
    res = _Processed(item=item)
    if item.reason is not None:
        return res
    try:
        data = reader.read(item)
    except OSError as exc:
        item.reason, item.detail = "read_error", f"{type(exc).__name__}: {exc}"
        return res
    res.sha256 = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_image(data, max_pixels=max_pixels)
    except DecodeError as exc:
        # PIL details may embed object addresses ("<_io.BytesIO object at 0x7f…>"): strip them
        # so a rerun writes byte-identical rows.
        item.reason, item.detail = exc.reason, _ADDRESS_RE.sub("<bytes>", exc.detail) or None
        return res
    try:
        res.width, res.height, res.orig_mode = decoded.width, decoded.height, decoded.original_mode
        res.phash = phash(decoded.image)
        res.tensors = {key: fn(decoded.image) for key, fn in preps.items()}
    except Exception as exc:  # noqa: BLE001 - one odd image must not stop the shard
        item.reason, item.detail = "corrupt", f"preprocessing failed: {type(exc).__name__}: {exc}"
        res.tensors = None
    return res


def _clean_stale_tmp(folder: Path, shard_id: str) -> None:
    """Temporary files of this shard left by a killed run (atomic writes use '.<name>.*.tmp')."""
    for path in glob.glob(str(folder / f".{glob.escape(shard_id)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _validate_names(source: str, embedders: Mapping[str, Any]) -> None:
    if not SOURCE_RE.match(source):
        raise ValueError(f"source {source!r} must be 'pool', 'eval-<name>' or 'query-<name>'")
    if not embedders:
        raise ValueError("at least one embedder is required")
    for name in embedders:
        if not EMBEDDER_NAME_RE.match(name):
            raise ValueError(f"embedder name {name!r} must match {EMBEDDER_NAME_RE.pattern}")


def embed_shard(
    source: str,
    shard_id: str,
    input_path: str | Path,
    embedders: Mapping[str, EmbedderConfig | Embedder],
    out_dir: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    num_workers: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardStats:
    """Embed one input into ``OUT/embed/<source>/<shard_id>.{<embedder>.npy,parquet}``.

    Skips the shard when its parquet and matrices already exist (unless ``overwrite``).  Bad
    items become rows with ``status="error"`` and a reason; nothing about the
    input's content can make this raise (model/config problems do).
    ``num_workers`` decode threads (0 counts as 1); ``max_bytes`` caps the encoded
    size read per item (larger → ``too_large``).
    """
    _validate_names(source, embedders)
    names = sorted(embedders)
    parquet_path, npy_paths = shard_paths(out_dir, source, shard_id, names)
    stats = ShardStats(source=source, shard_id=shard_id, input_path=os.path.abspath(str(input_path)))
    if shard_done(out_dir, source, shard_id, names) and not overwrite:
        meta = pq.read_table(parquet_path, columns=["status", "reason"])
        statuses = meta.column("status").to_pylist()
        stats.n_items, stats.n_ok = len(statuses), statuses.count("ok")
        stats.n_error = stats.n_items - stats.n_ok
        stats.reasons = dict(Counter(r for r in meta.column("reason").to_pylist() if r is not None))
        stats.skipped = True
        return stats
    t0 = time.perf_counter()
    models = load_embedders({n: embedders[n] for n in names})
    parquet_path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(parquet_path.parent, shard_id)

    preps: dict[tuple, Callable] = {}
    for m in models.values():
        preps.setdefault(m.prep_key, m.preprocess)
    outputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    buffers: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def flush(name: str) -> None:
        if buffers[name]:
            outputs[name].append(models[name].embed(torch.stack(buffers[name])).astype(np.float16))
            buffers[name].clear()

    rows: list[_Processed] = []
    n_ok = 0
    window = max(2 * max(m.cfg.batch_size for m in models.values()), 4 * max(1, num_workers))
    from tqdm import tqdm

    with InputReader(input_path, max_bytes=max_bytes) as reader, ThreadPoolExecutor(
        max_workers=max(1, num_workers), thread_name_prefix="decode"
    ) as pool:
        items = reader.items()
        todo = iter(items)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < window:
                item = next(todo, None)
                if item is None:
                    return
                pending.append(pool.submit(_process, item, reader, preps, max_pixels))

        fill()
        bar = tqdm(total=len(items), desc=f"{source}/{shard_id}", unit="img", disable=not progress, leave=False)
        while pending:
            res = pending.popleft().result()
            fill()  # keep the workers busy while the model runs below
            rows.append(res)
            bar.update(1)
            if res.tensors is None:
                continue
            res.item.detail = None
            n_ok += 1
            for name in names:
                buffers[name].append(res.tensors[models[name].prep_key])
                if len(buffers[name]) >= models[name].cfg.batch_size:
                    flush(name)
            res.tensors = None  # free the pixels early
        bar.close()
    for name in names:
        flush(name)

    for name in names:
        parts = outputs[name]
        matrix = np.concatenate(parts) if parts else np.zeros((0, models[name].dim), dtype=np.float16)
        assert matrix.shape[0] == n_ok, (name, matrix.shape, n_ok)
        atomic_save_npy(npy_paths[name], matrix)
    table = _rows_to_table(rows, source, shard_id)
    atomic_write_parquet(parquet_path, table)  # last: its presence marks the shard complete

    stats.n_items = len(rows)
    stats.n_ok = n_ok
    stats.n_error = len(rows) - n_ok
    stats.reasons = dict(Counter(r.item.reason for r in rows if r.item.reason is not None))
    stats.seconds = time.perf_counter() - t0
    return stats


def _rows_to_table(rows: list[_Processed], source: str, shard_id: str) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in EMBED_SCHEMA.names}
    emb_row = 0
    for r in rows:
        it = r.item
        ok = it.reason is None
        cols["id"].append(f"{source}/{shard_id}/{it.id_key}")
        cols["source"].append(source)
        cols["shard_id"].append(shard_id)
        cols["input_path"].append(safe_text(it.input_path))
        cols["input_path_bytes"].append(raw_path_bytes(it.input_path))
        cols["member"].append(it.member)
        cols["key"].append(it.key)
        cols["ext"].append(it.ext)
        cols["url"].append(it.url)
        cols["caption"].append(it.caption)
        cols["sha256"].append(r.sha256)
        cols["phash"].append(r.phash if ok else None)
        cols["width"].append(r.width if ok else None)
        cols["height"].append(r.height if ok else None)
        cols["orig_mode"].append(r.orig_mode if ok else None)
        cols["status"].append("ok" if ok else "error")
        cols["reason"].append(it.reason)
        cols["detail"].append(safe_text(it.detail) if not ok and it.detail else None)
        cols["emb_row"].append(emb_row if ok else -1)
        cols["byte_offset"].append(it.byte_offset)
        cols["byte_size"].append(it.byte_size)
        emb_row += ok
    return pa.Table.from_pydict(cols, schema=EMBED_SCHEMA)


# ----------------------------------------------------------------------------- stage
shard_id_for = layout.shard_id


def task_shards(num_inputs: int, task_index: int, num_tasks: int) -> list[int]:
    """Round-robin: shard i belongs to task ``i % num_tasks`` (spreads size drift across tasks)."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index {task_index} out of range for num_tasks {num_tasks}")
    return list(range(task_index, num_inputs, num_tasks))


def embed_stage(
    source: str,
    inputs: Sequence[str],
    embedders: Mapping[str, EmbedderConfig | Embedder],
    out_dir: str | Path,
    task_index: int = 0,
    num_tasks: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    num_workers: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> StageStats:
    """Embed this task's shards of ``source``.

    ``inputs`` are patterns (see :func:`curation.ingest.expand_inputs`); shard ids
    ``s000000…`` follow the sorted expanded list, and shard i is processed by task
    ``i % num_tasks``.  Models are loaded once, and only if some shard is unfinished.
    """
    _validate_names(source, embedders)
    expanded = expand_inputs(list(inputs))
    mine = task_shards(len(expanded), task_index, num_tasks)
    stats = StageStats(source=source, task_index=task_index, num_tasks=num_tasks)
    names = sorted(embedders)
    todo = [i for i in mine if not shard_done(out_dir, source, shard_id_for(i), names)]
    loaded = load_embedders(embedders) if todo else dict(embedders)
    from tqdm import tqdm

    for i in tqdm(mine, desc=f"embed {source} task {task_index}/{num_tasks}", unit="shard", disable=not progress):
        shard_stats = embed_shard(
            source, shard_id_for(i), expanded[i], loaded, out_dir, max_pixels,
            num_workers=num_workers, max_bytes=max_bytes, progress=progress,
        )
        stats.shards.append(shard_stats)
        if not shard_stats.skipped:
            log.info("embedded %s/%s: %d ok, %d errors %s (%.1f img/s)", source, shard_stats.shard_id,
                     shard_stats.n_ok, shard_stats.n_error, shard_stats.reasons, shard_stats.images_per_s)
    return stats
