"""The sharded dedup (curation/dedup_sharded.py) against the gathered one: byte-identical decisions."""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import clustered_pool as _pool
from conftest import sigkill_when, write_embed_shard

from curation import layout
from curation.choices import Sharding
from curation.dedup import DedupConfig, run_dedup
from curation.dedup_sharded import run_dedup_sharded
from curation.index import IndexConfig
from curation.jobs import ExecutorConfig
from curation.sharding import ShardingConfig, split_range, split_shards
from curation.whiten import WhiteningConfig

EMB = "e"  # the embedder name clustered_pool writes


WHITEN = WhiteningConfig(kind="pca", dim=24, shrinkage=0.25, n_sample=1000)

CONFIGS = {
    "ivf_gemm": DedupConfig(embedder=EMB, k=4, max_k=32, threshold=0.9,
                            index=IndexConfig(kind="ivf_gemm", gemm_list_size=40, nprobe=3, search_batch=128,
                                              gemm_query_batch=128, gemm_train_per_centroid=16)),
    "flat": DedupConfig(embedder=EMB, k=4, max_k=32, threshold=0.9, index=IndexConfig(search_batch=128)),
}


@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whitened"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_sharded_dedup_decisions_are_byte_identical(tmp_path, kind, whiten):
    cfg = dataclasses.replace(CONFIGS[kind], whitening=WHITEN) if whiten else CONFIGS[kind]
    gathered, sharded = tmp_path / "g", tmp_path / "s"
    _pool(gathered)
    shutil.copytree(gathered, sharded)
    run_dedup(gathered, cfg)
    usage = run_dedup_sharded(sharded, cfg, ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                              progress=False, n_tasks=4)
    steps = [u["step"] for u in usage]
    assert steps.count("search") == 4 and steps.count("assign") == (4 if kind == "ivf_gemm" else 0)
    assert steps.count("whiten") == int(whiten)
    a = layout.dedup_decisions(gathered).read_bytes()
    b = layout.dedup_decisions(sharded).read_bytes()
    d = pd.read_parquet(layout.dedup_decisions(gathered))
    assert (~d["kept"]).sum() > 60, "the pool must have duplicates to find"
    assert set(d["reason"].dropna()) >= {"exact_duplicate", "near_duplicate"}
    assert a == b
    sg, ss = (json.loads(layout.stats_path(layout.dedup_decisions(o)).read_text()) for o in (gathered, sharded))
    assert {k: v for k, v in sg.items() if not k.endswith("_s")} == {k: v for k, v in ss.items() if not k.endswith("_s")}
    assert sg["index_kind"] == kind and sg["requeried"] > 0 and sg["near_edges"] > 0
    assert (sg["whitening"] is not None) == whiten
    assert not layout.dedup_work(sharded).exists(), "the list-ordered copy of the pool is removed"


def test_split_helpers_cover_everything_once():
    assert split_shards([5, 5, 5, 5, 5, 5, 5, 5, 5, 5], 8)[0] == (0, 1)
    blocks = split_shards([3, 9, 1, 1, 7, 2], 3)
    assert blocks[0][0] == 0 and blocks[-1][1] == 6 and all(a < b for a, b in blocks)
    assert all(x[1] == y[0] for x, y in zip(blocks, blocks[1:]))
    ranges = split_range(1000, 128, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1000 and all(a % 128 == 0 for a, _ in ranges)
    assert split_range(100, 128, 4) == [(0, 100)]


def test_killed_sharded_dedup_reruns_to_identical_decisions(tmp_path):
    """SIGKILL the sharded stage (local executor) while its assign tasks write, rerun: same bytes."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    _pool(ref)
    shutil.copytree(ref, out)
    cfg = CONFIGS["ivf_gemm"]
    run_dedup_sharded(ref, cfg, ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                      progress=False, n_tasks=4)
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); from test_curation_shard import *; "
        "run_dedup_sharded(sys.argv[1], CONFIGS['ivf_gemm'], ShardingConfig(mode='sharded'), "
        "ExecutorConfig(cluster='local', poll_interval_s=0.1), progress=False, n_tasks=4)")
    pieces = layout.dedup_work(out) / "pieces"
    # kill once some blocks assigned, not searched
    rc = sigkill_when(["-c", script, str(out), str(Path(__file__).parent)], settle_s=1.0,
                      ready=lambda: pieces.is_dir() and any(pieces.glob("*.counts.npy")))
    assert rc == -signal.SIGKILL, "the run was not interrupted: the kill point came too late"
    assert not layout.dedup_decisions(out).exists()
    run_dedup_sharded(out, cfg, ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                      progress=False, n_tasks=4)
    assert layout.dedup_decisions(out).read_bytes() == layout.dedup_decisions(ref).read_bytes()


def test_sharding_config_is_validated():
    from dinov2.utils.config import ConfigError

    with pytest.raises(ConfigError, match="sharding.mode"):
        ShardingConfig(mode="sometimes").validate()
    with pytest.raises(ConfigError, match="block_items"):
        ShardingConfig(block_items=0).validate()
    auto = ShardingConfig(min_items=1000)
    auto.validate()
    assert not auto.sharded(999) and auto.sharded(1000)
    assert ShardingConfig(mode="gathered", min_items=1).sharded(10**9) is False


def test_auto_index_of_a_pool_too_big_for_one_process_is_planned_as_ivf_gemm(tmp_path):
    """The float32 cap that sends the gathered job's ``auto`` to IVF-PQ does not refuse the sharded
    stage (whose tasks hold one block): it plans ivf_gemm lists; an explicit ivfpq is still refused."""
    from curation.dedup_sharded import make_plan
    from curation.index_plan import plan_index
    from curation.store import ShardedVectors
    from dinov2.utils.config import ConfigError

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], np.random.default_rng(i).standard_normal((400, 16)).astype(np.float16))
    vectors = ShardedVectors(paths)
    tiny_cap = IndexConfig(flat_max=100, max_memory_gb=1e-6, gemm_list_size=100)
    assert plan_index(vectors.n, vectors.dim, tiny_cap).kind == "ivfpq"  # what the gathered job would build
    plan = make_plan(vectors, DedupConfig(index=tiny_cap), ShardingConfig(mode="sharded"), n_tasks=3)
    assert plan["kind"] == "ivf_gemm" and plan["nlist"] == 12 and len(plan["blocks"]) == 3
    with pytest.raises(ConfigError, match="dedup.index.kind"):
        make_plan(vectors, DedupConfig(index=dataclasses.replace(tiny_cap, kind="ivfpq")),
                  ShardingConfig(mode="sharded"), n_tasks=3)


def test_sharded_tasks_of_an_auto_pool_past_the_memory_cap_run_the_plans_ivf_gemm(tmp_path):
    """Every step (train, assign, search) sizes the index as the plan did — not as IVF-PQ, which the
    whole-pool cap would make of ``auto`` — so the run equals a gathered ivf_gemm run byte for byte."""
    capped = dataclasses.replace(CONFIGS["ivf_gemm"].index, kind="auto", flat_max=100, max_memory_gb=1e-6)
    gathered, sharded = tmp_path / "g", tmp_path / "s"
    _pool(gathered)
    shutil.copytree(gathered, sharded)
    run_dedup(gathered, CONFIGS["ivf_gemm"])
    run_dedup_sharded(sharded, dataclasses.replace(CONFIGS["ivf_gemm"], index=capped),
                      ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                      progress=False, n_tasks=4)
    assert layout.dedup_decisions(gathered).read_bytes() == layout.dedup_decisions(sharded).read_bytes()


@pytest.mark.parametrize("whiten", [False, True], ids=["raw", "whitened"])
def test_sharded_decontamination_decisions_are_byte_identical(tmp_path, whiten):
    from curation.decontaminate import DecontamConfig, run_decontaminate
    from curation.decontaminate_sharded import run_decontaminate_sharded

    gathered, sharded = tmp_path / "g", tmp_path / "s"
    _pool(gathered, n_shards=5)
    rng = np.random.default_rng(1)
    pool = np.concatenate([np.load(layout.embed_npy(gathered, "pool", layout.shard_id(s), EMB)) for s in range(5)])
    ev = pool[rng.choice(len(pool), 40, replace=False)].astype(np.float32)
    ev = ev + 0.02 * rng.standard_normal(ev.shape).astype(np.float32)
    write_embed_shard(gathered, "eval-x", layout.shard_id(0), pd.DataFrame({"key": [f"e{i}" for i in range(40)]}),
                      {EMB: ev})
    run_dedup(gathered, CONFIGS["flat"])
    shutil.copytree(gathered, sharded)
    cfg = DecontamConfig(embedder=EMB, threshold=0.9, index=IndexConfig(search_batch=64),
                         whitening=WHITEN if whiten else WhiteningConfig())
    run_decontaminate(gathered, cfg)
    usage = run_decontaminate_sharded(sharded, cfg, ShardingConfig(mode=Sharding.sharded),
                                      ExecutorConfig(cluster="debug"), progress=False, n_tasks=4)
    assert [u["step"] for u in usage].count("match") == 4
    d = pd.read_parquet(layout.decontaminate_decisions(gathered))
    assert d["contaminated"].sum() >= 40 and d["via_component"].any()
    a, b = (layout.decontaminate_decisions(o).read_bytes() for o in (gathered, sharded))
    assert a == b
    assert not layout.decontaminate_work(sharded).exists()
