"""The write plan's pure parts, shared by the gathered (:mod:`curation.write`) and the sharded
(:mod:`curation.write_sharded`) write stage, so both give the same plan, shards and manifest bytes.

- :func:`decide`: one block of pool input rows joined with the decisions of every stage (any block:
  the whole pool in the gathered job, a few embed shards in a sharded task);
- :func:`output_positions`: the seeded shuffle of the sorted kept rows, as a bijection computed
  per position (a Feistel network with cycle walking), so a task needs only its rows' global ranks,
  never a permutation of the whole pool;
- :data:`PLAN_SCHEMA` / :func:`plan_table`: one fixed Arrow schema (and pandas metadata) for plan
  and manifest files whatever a block holds (a block whose column is all null keeps its type);
- :func:`parquet_stream`: a Parquet writer with fixed-size row groups, so a file written block
  by block has the same bytes as one written from a single frame.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinov2.utils.io import atomic_path

from . import layout

MANIFEST_COLUMNS = (
    "id", "source_shard", "input_path", "member", "key", "sha256", "width", "height",
    "decision", "stage", "reason", "detail",
    "component", "component_size", "representative_id", "nn_id", "nn_sim",
    "eval_set", "eval_id", "eval_sim",
    "cluster", "hk_path", "query_sets", "best_query_id", "best_query_sim",
    "output_shard", "output_key",
)
EXTRA_COLUMNS = ("ext", "url", "caption", "byte_offset", "byte_size", "input_path_bytes", "output_pos")
PLAN_COLUMNS = MANIFEST_COLUMNS + EXTRA_COLUMNS
_INT = ("width", "height", "component", "component_size", "cluster", "byte_offset", "byte_size", "output_pos")
_FLOAT = ("nn_sim", "eval_sim", "best_query_sim")  # float64 holds float32 and float64 inputs exactly
_TYPES = {**{c: pa.int64() for c in _INT}, **{c: pa.float64() for c in _FLOAT}, "input_path_bytes": pa.binary()}
ROW_GROUP_ROWS = 1 << 16  # plan and manifest files: fixed row groups, however the rows were produced


class WriteError(RuntimeError):
    """The write stage cannot run (missing or inconsistent inputs); the message says why."""


def _schema(columns: tuple[str, ...]) -> pa.Schema:
    fields = [pa.field(c, _TYPES.get(c, pa.string())) for c in columns]
    empty = pd.DataFrame({c: pd.Series([], dtype="Int64" if c in _INT else "float64" if c in _FLOAT else object)
                          for c in columns})
    meta = pa.Table.from_pandas(empty, schema=pa.schema(fields), preserve_index=False).schema.metadata
    return pa.schema(fields, metadata=meta)


PLAN_SCHEMA = _schema(PLAN_COLUMNS)
MANIFEST_SCHEMA = _schema(MANIFEST_COLUMNS)


def plan_table(df: pd.DataFrame, schema: pa.Schema = PLAN_SCHEMA) -> pa.Table:
    """``df``'s columns of ``schema`` as a table of exactly that schema (types and metadata)."""
    table = pa.Table.from_pandas(df[schema.names], schema=pa.schema(list(schema)), preserve_index=False)
    return table.replace_schema_metadata(schema.metadata)


@contextlib.contextmanager
def parquet_stream(path: str | Path, schema: pa.Schema, rows: int = ROW_GROUP_ROWS) -> Iterator[Callable[[pa.Table], None]]:
    """Yield ``add(table)``; the tables are written (atomically, on success) in row groups of exactly
    ``rows`` rows (the last may be short), so the bytes do not depend on how the rows were chunked."""
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema)
        pending: list[pa.Table] = []
        count = 0

        def add(table: pa.Table) -> None:
            nonlocal pending, count
            pending.append(table.replace_schema_metadata(schema.metadata))
            count += len(table)
            if count >= rows:
                merged = pa.concat_tables(pending)
                full = (count // rows) * rows
                writer.write_table(merged.slice(0, full), row_group_size=rows)
                pending, count = [merged.slice(full)], count - full

        try:
            yield add
            if count:
                writer.write_table(pa.concat_tables(pending), row_group_size=rows)
        finally:
            writer.close()


# ----------------------------------------------------------------------------- decisions
def read_decisions(path: Path, columns: tuple[str, ...], required: bool, id_range: tuple[str, str] | None = None
                   ) -> pd.DataFrame | None:
    """A stage's decision file (only the ids in ``id_range``, inclusive, when given: row groups
    outside it are skipped by their statistics)."""
    if not path.is_file():
        if required:
            raise WriteError(f"missing {path}: run the stage that writes it first")
        return None
    names = pq.ParquetFile(path).schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise WriteError(f"{path} lacks columns {missing}")
    filters = [("id", ">=", id_range[0]), ("id", "<=", id_range[1])] if id_range else None
    return pq.read_table(path, filters=filters).to_pandas()


DEDUP_COLUMNS = ("id", "component", "component_size", "kept", "reason", "representative_id", "nn_id", "nn_sim")
DECON_COLUMNS = ("id", "contaminated", "eval_set", "eval_id", "eval_sim")
SELECTION_COLUMNS = ("id", "selected", "query_sets", "cluster", "hk_path", "best_query_id", "best_query_sim")


def read_block_decisions(out_dir: Path, id_range: tuple[str, str] | None, decontaminate_required: bool,
                         retrieve_required: bool) -> tuple:
    return (read_decisions(layout.dedup_decisions(out_dir), DEDUP_COLUMNS, True, id_range),
            read_decisions(layout.decontaminate_decisions(out_dir), DECON_COLUMNS, decontaminate_required, id_range),
            read_decisions(layout.retrieve_selection(out_dir), SELECTION_COLUMNS, retrieve_required, id_range))


def decide(df: pd.DataFrame, dedup: pd.DataFrame, decon: pd.DataFrame | None, sel: pd.DataFrame | None) -> pd.DataFrame:
    """Every row's fate (kept / dropped at which stage, why) from the decisions; rows sorted by id,
    output columns empty (see :func:`assign_outputs`)."""
    n = len(df)
    decision = np.full(n, "kept", dtype=object)
    stage = np.full(n, "write", dtype=object)
    reason = np.full(n, None, dtype=object)
    ok = (df["status"] == "ok").to_numpy()
    decision[~ok] = "dropped"
    stage[~ok] = "embed"
    reason[~ok] = df.loc[~ok, "reason"].fillna("error").to_numpy()

    dedup = dedup.rename(columns={"kept": "dedup_kept", "reason": "dedup_reason"})
    df = df.merge(dedup[[c if c not in ("kept", "reason") else f"dedup_{c}" for c in DEDUP_COLUMNS]],
                  on="id", how="left", validate="one_to_one")
    missing = ok & df["dedup_kept"].isna().to_numpy()
    if missing.any():
        raise WriteError(
            f"{int(missing.sum())} decoded pool images have no dedup decision "
            f"(e.g. {df.loc[missing, 'id'].iloc[0]!r}): dedup outputs are stale, rerun dedup"
        )
    dropped = ok & ~df["dedup_kept"].fillna(True).astype(bool).to_numpy()
    decision[dropped], stage[dropped] = "dropped", "dedup"
    reason[dropped] = df.loc[dropped, "dedup_reason"].fillna("duplicate").to_numpy()
    alive = ok & ~dropped

    if decon is not None:
        keep_cols = list(DECON_COLUMNS) + (["via_component"] if "via_component" in decon.columns else [])
        df = df.merge(decon[keep_cols], on="id", how="left", validate="one_to_one")
        missing = alive & df["contaminated"].isna().to_numpy()
        if missing.any():
            raise WriteError(
                f"{int(missing.sum())} deduplicated images have no decontamination decision "
                f"(e.g. {df.loc[missing, 'id'].iloc[0]!r}): rerun decontaminate"
            )
        bad = alive & df["contaminated"].fillna(False).astype(bool).to_numpy()
        via = df["via_component"].fillna(False).astype(bool).to_numpy() if "via_component" in df else np.zeros(n, bool)
        decision[bad], stage[bad] = "dropped", "decontaminate"
        reason[bad & via] = "eval_copy_component"
        reason[bad & ~via] = "eval_copy"
        alive &= ~bad

    if sel is not None:
        df = df.merge(sel[list(SELECTION_COLUMNS)], on="id", how="left", validate="one_to_one")
        missing = alive & df["selected"].isna().to_numpy()
        if missing.any():
            raise WriteError(
                f"{int(missing.sum())} candidates have no retrieval decision "
                f"(e.g. {df.loc[missing, 'id'].iloc[0]!r}): rerun retrieve"
            )
        unsel = alive & ~df["selected"].fillna(False).astype(bool).to_numpy()
        decision[unsel], stage[unsel], reason[unsel] = "dropped", "retrieve", "not_selected"

    df["decision"], df["stage"], df["reason"] = decision, stage, reason
    df["source_shard"] = df["shard_id"]
    for c in PLAN_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df["output_pos"] = -1
    # Left joins turn integer columns with gaps into floats; keep them integers (nullable).
    for c in _INT:
        df[c] = pd.to_numeric(df[c], errors="coerce").round().astype("Int64")
    return df[list(PLAN_COLUMNS)].sort_values("id", kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------- output order
_ROUNDS = 6


def _mix(x: np.ndarray) -> np.ndarray:
    """A 64-bit finaliser (splitmix64's): every input bit reaches every output bit."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    """A bijection of ``[0, 4**half)`` (balanced Feistel network over two ``half``-bit halves)."""
    mask, shift = np.uint64((1 << half) - 1), np.uint64(half)
    left, right = x >> shift, x & mask
    for k in keys:
        left, right = right, left ^ (_mix(right ^ k) & mask)
    return (left << shift) | right


def output_positions(ranks: np.ndarray, n: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Output position of the kept rows of sorted-id rank ``ranks`` (of ``n`` kept rows): a seeded
    permutation of ``0..n-1`` evaluated per rank (cycle walking keeps the Feistel bijection inside
    ``0..n-1``), so any block of ranks is placed without the rest of the pool."""
    ranks = np.asarray(ranks, dtype=np.int64)
    if not shuffle or n <= 1:
        return ranks.copy()
    if ranks.size and (ranks.min() < 0 or ranks.max() >= n):
        raise ValueError(f"ranks outside 0..{n - 1}")
    half = max(1, (int(n - 1).bit_length() + 1) // 2)
    keys = np.random.default_rng([seed, n]).integers(0, 2**64 - 1, size=_ROUNDS, dtype=np.uint64, endpoint=True)
    y = _feistel(ranks.astype(np.uint64), half, keys)
    out = y >= np.uint64(n)
    while out.any():  # walk the cycle until it re-enters 0..n-1 (domain < 4 n: a few steps)
        y[out] = _feistel(y[out], half, keys)
        out = y >= np.uint64(n)
    return y.astype(np.int64)


def assign_outputs(plan: pd.DataFrame, first_rank: int, n_kept: int, seed: int, prefix: str,
                   images_per_shard: int, shuffle: bool) -> pd.DataFrame:
    """Output shard / key / position of the kept rows of an id-sorted block whose first kept row
    has global rank ``first_rank`` among ``n_kept`` kept rows."""
    kept = np.flatnonzero((plan["decision"] == "kept").to_numpy())
    pos = output_positions(first_rank + np.arange(len(kept)), n_kept, seed, shuffle)
    shard = np.full(len(plan), None, dtype=object)
    key = np.full(len(plan), None, dtype=object)
    shard[kept] = [layout.output_shard_name(prefix, int(p) // images_per_shard) for p in pos]
    key[kept] = [f"{int(p):09d}" for p in pos]
    out_pos = np.full(len(plan), -1, dtype=np.int64)
    out_pos[kept] = pos
    plan = plan.copy()
    plan["output_shard"], plan["output_key"], plan["output_pos"] = shard, key, pd.array(out_pos, dtype="Int64")
    return plan


# ----------------------------------------------------------------------------- manifest
def manifest_block(plan: pd.DataFrame, failed: dict[str, list[str]]) -> pd.DataFrame:
    """A plan block's manifest rows: images the shard writers could not copy are dropped at write."""
    manifest = plan.copy()
    if failed:
        hit = manifest["id"].isin(list(failed))
        if hit.any():
            manifest.loc[hit, "decision"] = "dropped"
            manifest.loc[hit, "stage"] = "write"
            manifest.loc[hit, "reason"] = manifest.loc[hit, "id"].map(lambda i: failed[i][0])
            manifest.loc[hit, "detail"] = manifest.loc[hit, "id"].map(lambda i: failed[i][1])
            manifest.loc[hit, "output_shard"] = None
            manifest.loc[hit, "output_key"] = None
    return manifest[list(MANIFEST_COLUMNS)]


def count_block(manifest: pd.DataFrame, funnel: Counter, dropped: dict[str, Counter]) -> None:
    """Add a manifest block's funnel counts and dropped reasons (the counts are sums over rows)."""
    from .funnel import funnel_counts

    funnel.update(funnel_counts(manifest))
    for st, g in manifest[manifest["decision"] == "dropped"].groupby("stage", sort=True):
        dropped.setdefault(str(st), Counter()).update(
            {str(r): int(c) for r, c in g["reason"].value_counts(dropna=False).items()})
