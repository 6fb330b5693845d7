"""Stage 5: write the curated dataset as LVD-style WebDataset shards + a manifest.

Three steps, each resumable on its own:

1. ``plan_write`` joins every pool input row (``OUT/embed/pool/*.parquet``) with the
   dedup, decontamination and retrieval decisions, decides each row's fate and gives
   every kept image its output shard and key (``%09d``, sequential over a seeded
   permutation of the sorted ids).  Written to ``OUT/write/plan.parquet``.
2. ``write_shards`` copies the ORIGINAL bytes of each kept image (via the embed
   parquet's ``input_path``/``byte_offset``/``byte_size``, sha256-verified) into
   ``OUT/final/lvd-%06d.tar`` (atomic, byte-identical on rerun; members named after the
   bytes' real format, see :mod:`dinov2.data.shards`) and records the
   shard's sha256/count in ``OUT/write/shards/lvd-%06d.json``.  Shards are split over
   tasks (shard i → task i % num_tasks) so this step can be a job array.
3. ``finalize_write`` merges the shard records into ``OUT/final/manifest.parquet``
   (one row per INPUT item) and ``OUT/final/summary.json`` (funnel + shard hashes).

``OUT/write/`` holds bookkeeping only; ``OUT/final/`` is the deliverable.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dinov2.data.shards import RangeReader, ShardWriter, ShortRead, written_image_ext
from dinov2.utils.io import atomic_write_json, sha256_file

from . import layout
from .calibrate import read_calibration
from .funnel import FUNNEL_ORDER
from .health import output_warnings
from .retrieval_plan import read_choice
from .text import stored_path
from .write_plan import (  # noqa: F401 - MANIFEST_COLUMNS, WriteError: public names of this stage
    MANIFEST_COLUMNS,
    MANIFEST_SCHEMA,
    PLAN_SCHEMA,
    WriteError,
    assign_outputs,
    count_block,
    decide,
    manifest_block,
    parquet_stream,
    plan_table,
    read_block_decisions,
)


@dataclass
class WriteConfig:
    images_per_shard: int = 5000  # LVD-style fixed-size shards (the last one may be short)
    shard_prefix: str = "lvd"
    shuffle: bool = True  # seeded permutation so each shard is a sample of the whole set
    verify_sha256: bool = True  # re-hash the copied bytes against the embed stage's sha256

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        if self.images_per_shard < 1:
            raise ConfigError(f"key 'write.images_per_shard': must be >= 1, got {self.images_per_shard}")
        if not self.shard_prefix or "/" in self.shard_prefix:
            raise ConfigError(f"key 'write.shard_prefix': invalid prefix {self.shard_prefix!r}")


def _none(v: Any) -> Any:
    """pandas/numpy missing values and scalars → plain Python (JSON/parquet friendly)."""
    if v is None:
        return None
    if isinstance(v, float) and math.isnan(v):
        return None
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        v = v.item()
        if isinstance(v, float) and math.isnan(v):
            return None
    return v


# ----------------------------------------------------------------------------- step 1: plan
def _read_embed_pool(out_dir: Path) -> pd.DataFrame:
    folder = layout.embed_dir(out_dir, layout.POOL)
    files = [p for _, p in layout.embed_shards(out_dir, layout.POOL)]
    if not files:
        raise WriteError(f"no embed outputs under {folder}: run the embed stage first")
    tables = [pq.read_table(f) for f in files]
    df = pa.concat_tables(tables, promote_options="default").to_pandas()
    if df["id"].duplicated().any():
        dup = df.loc[df["id"].duplicated(), "id"].iloc[0]
        raise WriteError(f"embed outputs hold duplicate id {dup!r}")
    return df


def build_plan(
    out_dir: str | Path,
    cfg: WriteConfig,
    seed: int = 0,
    decontaminate_required: bool = True,
    retrieve_required: bool = True,
) -> pd.DataFrame:
    """Join inputs with every stage's decisions; assign output shard/key to kept rows.

    Output order: the kept rows sorted by id (a pure function of the inputs), placed by the seeded
    permutation of :func:`curation.write_plan.output_positions` (the sharded plan places its blocks
    with the same function, see :mod:`curation.write_sharded`)."""
    out_dir = Path(out_dir)
    df = _read_embed_pool(out_dir)
    plan = decide(df, *read_block_decisions(out_dir, None, decontaminate_required, retrieve_required))
    n_kept = int((plan["decision"] == "kept").sum())
    return assign_outputs(plan, 0, n_kept, seed, cfg.shard_prefix, cfg.images_per_shard, cfg.shuffle)


def write_plan_file(path: Path, plan: pd.DataFrame) -> None:
    with parquet_stream(path, PLAN_SCHEMA) as add:
        add(plan_table(plan))


def plan_write(out_dir: str | Path, cfg: WriteConfig, seed: int = 0, **kw: Any) -> pd.DataFrame:
    """Build (or load, if already written) the write plan."""
    path = layout.write_plan(out_dir)
    if path.is_file():
        return pq.read_table(path).to_pandas()
    plan = build_plan(out_dir, cfg, seed=seed, **kw)
    write_plan_file(path, plan)
    return pq.read_table(path).to_pandas()  # as the later steps read it (one schema for every path)


# ----------------------------------------------------------------------------- step 2: shards
def _sample_json(row: dict) -> bytes:
    meta = {
        "key": row["output_key"],
        "id": row["id"],
        "source_shard": row["source_shard"],
        "source_key": row.get("key"),
        "url": row.get("url"),
        "caption": row.get("caption"),
        "width": row.get("width"),
        "height": row.get("height"),
        "sha256": row["sha256"],
        "cluster": row.get("cluster"),
        "hk_path": row.get("hk_path"),
        "query_sets": row.get("query_sets"),
        "component": row.get("component"),
    }
    meta = {k: _none(v) for k, v in meta.items()}
    return json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _rows_digest(rows: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for rid, key, sha in zip(rows["id"], rows["output_key"], rows["sha256"]):
        h.update(f"{rid}\t{key}\t{sha}\n".encode())
    return h.hexdigest()


def write_one_shard(out_dir: str | Path, name: str, rows: pd.DataFrame, verify_sha256: bool = True) -> dict:
    """Write one output shard from its plan rows (sorted by key); return its record."""
    out_dir = Path(out_dir)
    rows = rows.sort_values("output_key", kind="stable")
    digest = _rows_digest(rows)
    record_path = layout.write_shard_record(out_dir, name)
    tar_path = layout.final_shard(out_dir, name)
    if record_path.is_file() and tar_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("plan_digest") == digest and tar_path.stat().st_size == record.get("bytes"):
            return record  # complete from an earlier run
    failed: dict[str, list[str]] = {}
    with RangeReader() as reader, ShardWriter(tar_path) as tar:
        for row in rows.to_dict("records"):
            source = stored_path(row["input_path"], _none(row.get("input_path_bytes")))
            try:
                data = reader.read(source, int(row["byte_offset"]), int(row["byte_size"]))
            except ShortRead as exc:
                failed[row["id"]] = ["source_changed", str(exc)]
                continue
            except OSError as exc:
                failed[row["id"]] = ["source_unreadable", f"{row['input_path']}: {exc}"]
                continue
            if verify_sha256 and hashlib.sha256(data).hexdigest() != row["sha256"]:
                failed[row["id"]] = ["sha256_mismatch", f"source bytes of {row['member']} changed"]
                continue
            ext = written_image_ext(row.get("ext"), data)
            for member_name, payload in sorted([(f"{row['output_key']}.{ext}", data),
                                                (f"{row['output_key']}.json", _sample_json(row))]):
                tar.add(member_name, payload)
    count = len(rows) - len(failed)
    record = {
        "name": name,
        "sha256": sha256_file(tar_path),
        "bytes": tar_path.stat().st_size,
        "count": count,
        "planned": len(rows),
        "failed": failed,
        "plan_digest": digest,
    }
    atomic_write_json(record_path, record)  # written last: its presence marks the shard complete
    return record


def shard_groups(plan: pd.DataFrame) -> dict[str, pd.DataFrame]:
    kept = plan[plan["output_shard"].notna()]
    return {name: g for name, g in kept.groupby("output_shard", sort=True)}


def write_shards(out_dir: str | Path, cfg: WriteConfig, task_index: int = 0, num_tasks: int = 1,
                 progress: bool = True) -> list[dict]:
    """Write the shards that belong to this task (shard i → task i % num_tasks)."""
    path = layout.write_plan(out_dir)
    if not path.is_file():
        raise WriteError(f"missing {path}: run the write plan step first")
    plan = pq.read_table(path).to_pandas()
    groups = shard_groups(plan)
    mine = [name for i, name in enumerate(sorted(groups)) if i % num_tasks == task_index]
    from tqdm import tqdm

    records = []
    for name in tqdm(mine, desc=f"write shards (task {task_index}/{num_tasks})", disable=not progress):
        records.append(write_one_shard(out_dir, name, groups[name], verify_sha256=cfg.verify_sha256))
    return records


# ----------------------------------------------------------------------------- step 3: finalize
def _clean_stale_tmp(folder: Path) -> None:
    """A SIGKILLed atomic write leaves `.<name>.<random>.tmp`; remove those of our outputs."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


def finalize_write(out_dir: str | Path, cfg: WriteConfig) -> dict:
    """Merge shard records into manifest.parquet and summary.json; return the summary."""
    out_dir = Path(out_dir)
    if not layout.write_plan(out_dir).is_file():
        raise WriteError(f"missing {layout.write_plan(out_dir)}: the write stage did not finish its plan step")
    plan = pq.read_table(layout.write_plan(out_dir)).to_pandas()
    return finalize_blocks(out_dir, cfg, sorted(shard_groups(plan)), lambda: iter([plan]))


def finalize_blocks(out_dir: Path, cfg: WriteConfig, names: list[str],
                    blocks: Callable[[], Iterator[pd.DataFrame]]) -> dict:
    """The manifest and summary from the shard records of ``names`` and the plan's id-sorted
    ``blocks`` (streamed: the gathered job passes one block, the sharded finalize task one per plan
    task; the bytes are the same)."""
    shards, failed = [], {}
    for name in names:
        rp = layout.write_shard_record(out_dir, name)
        if not rp.is_file() or not layout.final_shard(out_dir, name).is_file():
            raise WriteError(f"shard {name} was not written (no {rp}): rerun the write stage")
        rec = json.loads(rp.read_text())
        shards.append({"name": name, "sha256": rec["sha256"], "count": rec["count"], "bytes": rec["bytes"]})
        failed.update(rec["failed"])

    funnel: Counter = Counter()
    dropped: dict[str, Counter] = {}
    with parquet_stream(layout.manifest(out_dir), MANIFEST_SCHEMA) as add:
        for plan in blocks():
            manifest = manifest_block(plan, failed)
            add(plan_table(manifest, MANIFEST_SCHEMA))
            count_block(manifest, funnel, dropped)
    funnel_d = {k: int(funnel[k]) for k in FUNNEL_ORDER}
    summary = {
        "funnel": funnel_d,
        "warnings": output_warnings(out_dir, funnel_d),
        "dropped": {st: dict(sorted(c.items())) for st, c in sorted(dropped.items())},
        "images_per_shard": cfg.images_per_shard,
        "num_shards": len(shards),
        "shards": shards,
    }
    summary["calibration"] = read_calibration(out_dir)  # thresholds used and their estimated quality
    summary["retrieval"] = read_choice(out_dir)  # method / clusters chosen and why, warnings
    atomic_write_json(layout.summary(out_dir), summary)
    _clean_stale_tmp(layout.final_dir(out_dir))
    return summary
