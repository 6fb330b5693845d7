"""Peak RSS per task of the write plan: the gathered job vs the sharded decide / place tasks.

A synthetic pool of ``--n`` ids (metadata only, no images: the plan never opens one) in ``--shards``
embed parquets, with dedup / decontamination / retrieval decision files; the gathered plan
(:func:`curation.write.plan_write`) and the sharded steps (:mod:`curation.write_sharded`) each run
as local executor tasks (one process each) and report their own ``ru_maxrss``.  The two plans are
compared row by row.

    python bench/write_plan_scale.py --n 1000000 --shards 16 --blocks 8
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's curation/, not bench/curation.py

from curation import jobs, layout
from curation.dedup_sharded import task_usage
from curation.sharding import ShardingConfig
from curation.write import WriteConfig, plan_write
from curation.write_sharded import make_plan, plan_block_path, prepare_work, task_decide, task_place
from dinov2.utils.io import atomic_write_parquet

CFG = WriteConfig(images_per_shard=5000)


def build_pool(out: Path, n: int, n_shards: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    per = -(-n // n_shards)
    ids_all = []
    for s in range(n_shards):
        m = min(per, n - s * per)
        sid = layout.shard_id(s)
        keys = [f"{i:09d}" for i in range(m)]
        ids = [f"pool/{sid}/{k}" for k in keys]
        ok = rng.random(m) > 0.01
        atomic_write_parquet(layout.embed_parquet(out, "pool", sid), pa.table({
            "id": ids, "source": ["pool"] * m, "shard_id": [sid] * m,
            "input_path": [f"/data/crawl/{s:05d}.tar"] * m, "member": [f"{k}.jpg" for k in keys], "key": keys,
            "ext": ["jpg"] * m, "url": [f"https://example.org/{s}/{k}.jpg" for k in keys], "caption": [None] * m,
            "sha256": [f"{s:08x}{i:056x}" for i in range(m)], "width": rng.integers(64, 1024, m),
            "height": rng.integers(64, 1024, m), "status": np.where(ok, "ok", "error"),
            "reason": np.where(ok, None, "not_an_image"), "detail": [None] * m,
            "byte_offset": np.arange(m, dtype=np.int64) * 20000, "byte_size": np.full(m, 20000, np.int64)}))
        ids_all.append(np.array(ids, dtype=object)[ok])
    ok_ids = np.concatenate(ids_all)
    k = len(ok_ids)
    kept = rng.random(k) > 0.2
    comp = np.arange(k, dtype=np.int64)
    atomic_write_parquet(layout.dedup_decisions(out), pa.table({
        "id": ok_ids, "component": comp, "component_size": np.ones(k, np.int64), "kept": kept,
        "reason": np.where(kept, None, "near_duplicate"), "representative_id": ok_ids,
        "nn_id": np.roll(ok_ids, 1), "nn_sim": rng.random(k).astype(np.float32)}))
    alive = ok_ids[kept]
    a = len(alive)
    cont = rng.random(a) < 0.01
    atomic_write_parquet(layout.decontaminate_decisions(out), pa.table({
        "id": alive, "contaminated": cont, "eval_set": np.where(cont, "ev", None),
        "eval_id": np.where(cont, "eval-ev/s000000/x", None), "eval_sim": rng.random(a).astype(np.float32),
        "via_component": np.zeros(a, bool)}))
    cand = alive[~cont]
    c = len(cand)
    sel = rng.random(c) < 0.5
    atomic_write_parquet(layout.retrieve_selection(out), pa.table({
        "id": cand, "selected": sel, "query_sets": np.where(sel, "q", None), "method": ["sample"] * c,
        "cluster": rng.integers(0, 1000, c), "hk_path": [None] * c,
        "best_query_id": ["query-q/s000000/a"] * c, "best_query_sim": rng.random(c).astype(np.float32)}))


def task_gathered_plan(out_dir: str, seed: int) -> dict:
    t0 = time.time()
    plan = plan_write(out_dir, CFG, seed=seed)
    return task_usage({"step": "gathered", "rows": len(plan), "wall_s": time.time() - t0})


def task_floor() -> dict:
    import curation.write_sharded  # noqa: F401 - the import is the measurement

    return task_usage({"step": "floor"})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="writeplan-"))
    out = root / "out"
    t0 = time.time()
    build_pool(out, args.n, args.shards)
    print(f"pool: {args.n} ids in {args.shards} shards, built in {time.time() - t0:.0f} s ({out})", flush=True)
    ex = jobs.ExecutorConfig(cluster="local", array_parallelism=1)  # one task at a time: 2-core machine
    logs = root / "logs"
    floor = jobs.run_tasks(ex, logs / "floor", "floor", task_floor, [()], progress=False)[0]
    t0 = time.time()
    gathered = jobs.run_tasks(ex, logs / "gathered", "gathered", task_gathered_plan, [(str(out), 0)], progress=False)[0]
    gathered["wall_s"] = time.time() - t0
    plan = make_plan(out, CFG, 0, ShardingConfig(mode="sharded"), writers=4, n_tasks=args.blocks)
    prepare_work(out, plan)
    n = len(plan["blocks"])
    rows = {}
    for name, fn in (("decide", task_decide), ("place", task_place)):
        t0 = time.time()
        usage = jobs.run_tasks(ex, logs / name, name, fn, [(str(out), plan, b) for b in range(n)], progress=False)
        rows[name] = {"tasks": n, "wall_s": time.time() - t0, "peak_rss_gb": max(u["peak_rss_gb"] for u in usage),
                      "cpu_s": sum(u["cpu_s"] for u in usage)}
    ref = pq.read_table(layout.write_plan(out)).to_pandas()
    got = pd.concat([pq.read_table(plan_block_path(out, b)).to_pandas() for b in range(n)], ignore_index=True)
    pd.testing.assert_frame_equal(got, ref)
    print(json.dumps({"n": args.n, "floor": floor, "gathered": gathered, "sharded": rows, "identical": True}, indent=1))


if __name__ == "__main__":
    main()
