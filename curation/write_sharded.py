"""The write stage past one node: the plan joined per block of input shards, never the whole pool.

Steps, each a submitit job or array on the configured executor (local processes or SLURM):

1. ``decide`` (array over blocks of whole embed shards): the block's input rows joined with the
   decisions of their ids (decision files are read by id range, row groups outside it skipped),
   with the gathered stage's own code (:func:`curation.write_plan.decide`); writes the block's
   id-sorted rows and its kept count.
2. ``place`` (array over the same blocks): ids sort as (shard, key), so a kept row's global rank is
   its block's offset (the earlier blocks' kept counts) plus its rank in the block; its output
   position is the seeded per-position permutation of that rank
   (:func:`curation.write_plan.output_positions`).  Writes the block's plan rows and its kept rows
   ordered by shard-writer task, one row group run per writer (the shuffle to the writers).
3. ``write`` (array, ``executor.write_tasks`` tasks): a writer reads its row groups of every block
   and writes its shards with :func:`curation.write.write_one_shard` (shard i → task i % n).
4. ``finalize`` (one task): the manifest and summary, streamed block by block with the gathered
   job's code (:func:`curation.write.finalize_blocks`).

Memory per task is O(rows of its block) (the writer's: of its shards).  Plan, shards and manifest
are byte-identical to the gathered job's; every step skips work whose files exist, so a killed run
resumes as long as the work plan is unchanged.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from curation import jobs, layout
from curation.dedup_sharded import setup_task, task_usage
from curation.sharding import ShardingConfig, split_shards
from curation.write import WriteConfig, finalize_blocks, shard_groups, write_one_shard
from curation.write_plan import (
    PLAN_SCHEMA,
    WriteError,
    assign_outputs,
    decide,
    parquet_stream,
    plan_table,
    read_block_decisions,
)
from dinov2.utils.io import atomic_write_json

WRITER_SCHEMA = PLAN_SCHEMA.append(pa.field("writer", pa.int64()))


def _stamp(path: Path) -> list | None:
    """What identifies a version of an input file (size, mtime): a changed input redoes the work."""
    return [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else None


def pool_inputs(out_dir: str | Path) -> tuple[list[str], list[Path], list[int]]:
    """Pool embed shards in id order (``pool/<shard>/…``: sorted by ``<shard>/``) and their row
    counts, from the Parquet footers only."""
    found = sorted(layout.embed_shards(out_dir, layout.POOL), key=lambda sp: sp[0] + "/")
    if not found:
        raise WriteError(f"no embed outputs under {layout.embed_dir(out_dir, layout.POOL)}: run the embed stage first")
    return [s for s, _ in found], [p for _, p in found], [pq.ParquetFile(p).metadata.num_rows for _, p in found]


def make_plan(out_dir: str | Path, cfg: WriteConfig, seed: int, sharding: ShardingConfig, writers: int,
              n_tasks: int = 0, decontaminate_required: bool = True, retrieve_required: bool = True) -> dict:
    """Blocks of whole embed shards and everything their results depend on (pure; JSON)."""
    out_dir = Path(out_dir)
    shards, paths, counts = pool_inputs(out_dir)
    blocks = split_shards(counts, n_tasks or sharding.num_blocks(sum(counts)))
    decisions = [layout.dedup_decisions(out_dir), layout.decontaminate_decisions(out_dir), layout.retrieve_selection(out_dir)]
    return {"shards": shards, "paths": [str(p) for p in paths], "counts": counts, "blocks": [list(b) for b in blocks],
            "inputs": [_stamp(p) for p in paths], "decisions": {str(p): _stamp(p) for p in decisions},
            "writers": int(writers), "seed": int(seed), "images_per_shard": cfg.images_per_shard,
            "shard_prefix": cfg.shard_prefix, "shuffle": bool(cfg.shuffle),
            "decontaminate_required": decontaminate_required, "retrieve_required": retrieve_required}


def _work(out_dir: str | Path) -> Path:
    return Path(out_dir) / "write" / "work"


def decided_path(out_dir, block: int, part: str) -> Path:
    return _work(out_dir) / "decided" / f"b{block:06d}.{part}"


def piece_path(out_dir, block: int) -> Path:
    """A block's kept rows ordered by (writer task, output position): the writers' row groups."""
    return _work(out_dir) / "pieces" / f"b{block:06d}.parquet"


def plan_block_path(out_dir, block: int) -> Path:
    return Path(out_dir) / "write" / "plan" / f"b{block:06d}.parquet"


# ----------------------------------------------------------------------------- pure cores
def decide_core(out_dir: str | Path, plan: dict, block: int) -> pd.DataFrame:
    a, b = plan["blocks"][block]
    tables = [pq.read_table(p) for p in plan["paths"][a:b]]
    df = pa.concat_tables(tables, promote_options="default").to_pandas()
    owner = np.repeat(np.array(plan["shards"][a:b], dtype=object), plan["counts"][a:b])
    bad = [i for i, o in zip(df["id"], owner) if not str(i).startswith(f"{layout.POOL}/{o}/")]
    if bad:
        raise WriteError(f"embed row id {bad[0]!r} is not of the form pool/<shard>/<key> of its shard: the sharded "
                         f"write plan needs ids that sort by shard (set sharding.mode: gathered)")
    if df["id"].duplicated().any():
        raise WriteError(f"embed outputs hold duplicate id {df.loc[df['id'].duplicated(), 'id'].iloc[0]!r}")
    id_range = (str(df["id"].min()), str(df["id"].max())) if len(df) else ("", "")
    return decide(df, *read_block_decisions(Path(out_dir), id_range, plan["decontaminate_required"],
                                            plan["retrieve_required"]))


def place_core(decided: pd.DataFrame, plan: dict, first_rank: int, n_kept: int) -> pd.DataFrame:
    return assign_outputs(decided, first_rank, n_kept, plan["seed"], plan["shard_prefix"], plan["images_per_shard"],
                          plan["shuffle"])


def kept_counts(out_dir: str | Path, plan: dict) -> list[int]:
    return [json.loads(decided_path(out_dir, b, "json").read_text())["kept"] for b in range(len(plan["blocks"]))]


# ----------------------------------------------------------------------------- task bodies
def task_decide(out_dir: str, plan: dict, block: int) -> dict:
    setup_task(0)
    done = decided_path(out_dir, block, "json")
    if not done.is_file():
        rows = decide_core(out_dir, plan, block)
        with parquet_stream(decided_path(out_dir, block, "parquet"), PLAN_SCHEMA) as add:
            add(plan_table(rows))
        atomic_write_json(done, {"rows": len(rows), "kept": int((rows["decision"] == "kept").sum())})
    return task_usage({"step": "decide", "task": block})


def task_place(out_dir: str, plan: dict, block: int) -> dict:
    setup_task(0)
    piece = piece_path(out_dir, block)
    if not piece.is_file():
        counts = kept_counts(out_dir, plan)
        decided = pq.read_table(decided_path(out_dir, block, "parquet")).to_pandas()
        rows = place_core(decided, plan, int(sum(counts[:block])), int(sum(counts)))
        with parquet_stream(plan_block_path(out_dir, block), PLAN_SCHEMA) as add:
            add(plan_table(rows))
        kept = rows[rows["output_shard"].notna()].copy()
        kept["writer"] = (kept["output_pos"].astype("int64") // plan["images_per_shard"]) % plan["writers"]
        kept = kept.sort_values(["writer", "output_pos"], kind="stable")
        with parquet_stream(piece, WRITER_SCHEMA) as add:  # one run of row groups per writer
            for _, g in kept.groupby("writer", sort=True):
                add(plan_table(g, WRITER_SCHEMA))
    return task_usage({"step": "place", "task": block})


def writer_rows(out_dir: str | Path, plan: dict, writer: int) -> pd.DataFrame:
    """This writer's kept rows from every block (row groups of other writers skipped by statistics)."""
    tables = [pq.read_table(piece_path(out_dir, b), filters=[("writer", "==", writer)]).drop_columns(["writer"])
              for b in range(len(plan["blocks"]))]
    table = pa.concat_tables([t.replace_schema_metadata(PLAN_SCHEMA.metadata) for t in tables])
    return table.replace_schema_metadata(PLAN_SCHEMA.metadata).to_pandas()


def task_write(out_dir: str, plan: dict, cfg: WriteConfig, writer: int) -> dict:
    setup_task(0)
    groups = shard_groups(writer_rows(out_dir, plan, writer))
    for name in sorted(groups):
        write_one_shard(out_dir, name, groups[name], verify_sha256=cfg.verify_sha256)
    return task_usage({"step": "write", "task": writer, "shards": len(groups)})


def shard_names(out_dir: str | Path, plan: dict) -> list[str]:
    n_kept = sum(kept_counts(out_dir, plan))
    return [layout.output_shard_name(plan["shard_prefix"], i) for i in range(math.ceil(n_kept / plan["images_per_shard"]))]


def task_finalize(out_dir: str, plan: dict, cfg: WriteConfig) -> dict:
    setup_task(0)

    def blocks():
        for b in range(len(plan["blocks"])):
            yield pq.read_table(plan_block_path(out_dir, b)).to_pandas()

    # The plan of record, streamed from the blocks with the gathered job's writer: the same bytes.
    with parquet_stream(layout.write_plan(out_dir), PLAN_SCHEMA) as add:
        for b in range(len(plan["blocks"])):
            add(pq.read_table(plan_block_path(out_dir, b)))
    summary = finalize_blocks(Path(out_dir), cfg, shard_names(out_dir, plan), blocks)
    return task_usage({"step": "finalize", "written": summary["funnel"]["written"]})


def remove_work(out_dir: str | Path) -> None:
    """After finalize: the decided blocks, writer pieces and plan blocks (~3x the plan) go; the run
    folder then holds what the gathered job leaves (plan.parquet, shard records, final/)."""
    shutil.rmtree(_work(out_dir), ignore_errors=True)
    shutil.rmtree(plan_block_path(out_dir, 0).parent, ignore_errors=True)


# ----------------------------------------------------------------------------- orchestration
def prepare_work(out_dir: str | Path, plan: dict) -> None:
    """Keep the steps' outputs only when they were made for this very plan (a killed run resumes)."""
    path = _work(out_dir) / "plan.json"
    if path.is_file() and json.loads(path.read_text()) == json.loads(json.dumps(plan)):
        return
    remove_work(out_dir)
    atomic_write_json(path, plan)


def run_write_sharded(out_dir: str | Path, cfg: WriteConfig, seed: int, sharding: ShardingConfig,
                      executor: jobs.ExecutorConfig, *, progress: bool = True, n_tasks: int = 0, **required: Any
                      ) -> list[dict]:
    """Run the four steps on ``executor``; returns every task's CPU time and peak RSS."""
    out_dir = str(out_dir)
    logs = Path(out_dir) / "logs" / "write"
    plan = make_plan(out_dir, cfg, seed, sharding, executor.write_tasks, n_tasks, **required)
    prepare_work(out_dir, plan)
    n, usage = len(plan["blocks"]), []

    def step(name: str, fn: Any, calls: list[tuple], gather: bool = False) -> None:
        usage.extend(jobs.run_tasks(executor, logs / name, f"write-{name}", fn, calls,
                                    [f"write {name} task {i}/{len(calls)}" for i in range(len(calls))],
                                    gather=gather, progress=progress))

    step("decide", task_decide, [(out_dir, plan, b) for b in range(n)])
    step("place", task_place, [(out_dir, plan, b) for b in range(n)])
    step("shards", task_write, [(out_dir, plan, cfg, w) for w in range(plan["writers"])])
    step("finalize", task_finalize, [(out_dir, plan, cfg)], gather=True)
    remove_work(out_dir)
    return usage


def use_sharded(out_dir: str | Path, sharding: ShardingConfig) -> bool:
    """``sharding.mode`` (auto: sharded from ``min_items`` pool input rows on, counted from the
    embed Parquet footers)."""
    if sharding.mode != "auto":
        return sharding.mode == "sharded"
    return sharding.sharded(sum(pool_inputs(out_dir)[2]))
