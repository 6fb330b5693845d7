"""The sharded retrieval (curation/retrieve_sharded.py) against the gathered one: byte-identical outputs."""
from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import clustered_pool, sigkill_when, write_embed_shard

from curation import layout, topk
from curation.choices import Sharding
from curation.dedup import DedupConfig, run_dedup
from curation.hkmeans import HKMeansConfig
from curation.index import IndexConfig
from curation.jobs import ExecutorConfig
from curation.retrieve import QuerySetConfig, RetrieveConfig, run_retrieve
from curation.retrieve_sharded import run_retrieve_sharded
from curation.sharding import ShardingConfig

EMB = "e"
CFG = RetrieveConfig(embedder=EMB, query_sets=[QuerySetConfig(name="near", method="sample", k=5),
                                                QuerySetConfig(name="few", method="cluster")],
                     n_clusters=12, min_queries_per_cluster=2, per_cluster=40, max_per_set=60,
                     hkmeans=HKMeansConfig(enabled=True, levels=[16, 4], target_size=300))


def _world(out: Path) -> None:
    """6 pool shards deduplicated, a sample-based and a cluster-based query set."""
    clustered_pool(out, n_shards=6, rows=200, emb=EMB)
    run_dedup(out, DedupConfig(embedder=EMB, k=4, threshold=0.9, index=IndexConfig(search_batch=128)))
    rng = np.random.default_rng(2)
    pool = np.concatenate([np.load(layout.embed_npy(out, "pool", layout.shard_id(s), EMB)) for s in range(6)])
    pool = pool.astype(np.float32)
    near = pool[rng.choice(len(pool), 40, replace=False)] + 0.05 * rng.standard_normal((40, pool.shape[1]))
    few = pool[[5] * 12] + 0.05 * rng.standard_normal((12, pool.shape[1]))  # one concept: one cluster
    for name, q in (("near", near), ("few", few)):
        write_embed_shard(out, f"query-{name}", layout.shard_id(0),
                          pd.DataFrame({"key": [f"q{i:03d}" for i in range(len(q))]}), {EMB: q.astype(np.float32)})


def _outputs(out: Path) -> tuple[bytes, bytes]:
    return layout.retrieve_selection(out).read_bytes(), layout.retrieve_clusters(out).read_bytes()


def test_keep_topk_breaks_ties_by_row():
    q = np.array([0, 0, 0, 0, 1, 1], np.int64)
    s = np.array([0.5, 0.9, 0.5, 0.5, 0.1, 0.2], np.float32)
    r = np.array([7, 3, 2, 9, 4, 5], np.int64)
    kq, ks, kr = topk.keep_topk(q, s, r, 3)
    assert kq.tolist() == [0, 0, 0, 1, 1] and kr.tolist() == [3, 2, 7, 5, 4]
    assert ks.tolist() == pytest.approx([0.9, 0.5, 0.5, 0.2, 0.1])


def test_block_topk_is_exact_and_split_invariant(monkeypatch):
    """Several chunks and query batches; two halves merged equal the whole, and both equal numpy."""
    monkeypatch.setattr(topk, "CHUNK_ROWS", 50)
    monkeypatch.setattr(topk, "QUERY_BATCH", 7)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(300, 20, replace=False)] + 0.1 * rng.standard_normal((20, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    cand = rng.random(300) > 0.3
    whole = topk.block_topk(x, q, 6, cand)
    halves = [topk.block_topk(x[a:b], q, 6, cand[a:b], row0=a) for a, b in ((0, 150), (150, 300))]
    merged = topk.keep_topk(*(np.concatenate(p) for p in zip(*halves)), 6)
    assert all(np.array_equal(a, b) for a, b in zip(whole, merged))
    sims = (q.astype(np.float64) @ x.T.astype(np.float64))
    sims[:, ~cand] = -np.inf
    expect = np.argsort(-sims, axis=1, kind="stable")[:, :6]
    assert np.array_equal(whole[2].reshape(20, 6), expect) and cand[whole[2]].all()


def test_block_topk_ties_go_to_the_smaller_row(monkeypatch):
    """Rows orthogonal to the query score exactly 0: the k-th place is a tie across chunks and halves."""
    monkeypatch.setattr(topk, "CHUNK_ROWS", 50)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[:, 0] = 0.0
    x[[40, 120, 250], 0] = 5.0  # the three clear winners
    q = np.eye(8, dtype=np.float32)[:1]
    cand = np.ones(300, bool)
    cand[[0, 1, 3]] = False
    _, s, r = topk.block_topk(x, q, 6, cand)
    assert r.tolist() == [40, 120, 250, 2, 4, 5] and (s[3:] == 0).all()
    halves = [topk.block_topk(x[a:b], q, 6, cand[a:b], row0=a) for a, b in ((0, 100), (100, 300))]
    assert topk.keep_topk(*(np.concatenate(p) for p in zip(*halves)), 6)[2].tolist() == r.tolist()


def test_sharded_retrieval_is_byte_identical(tmp_path, monkeypatch):
    monkeypatch.setattr(topk, "CHUNK_ROWS", 64)  # several GEMM chunks per shard and query batches
    monkeypatch.setattr(topk, "QUERY_BATCH", 16)
    gathered, sharded = tmp_path / "g", tmp_path / "s"
    _world(gathered)
    shutil.copytree(gathered, sharded)
    run_retrieve(gathered, CFG)
    usage = run_retrieve_sharded(sharded, CFG, ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                                 progress=False, n_tasks=4)
    steps = [u["step"] for u in usage]
    assert steps.count("search") == 4 and steps.count("train") == 1 and steps.count("hk-train") == 3
    parts = [u["part"] for u in usage if u["step"] == "assign"]
    assert all(parts.count(p) == 4 for p in ("labels", "hk0", "hk1", "hk2")) and len(parts) == 16
    sel = pd.read_parquet(layout.retrieve_selection(gathered))
    methods = set(",".join(sel["method"].dropna()).split(","))
    assert methods == {"sample", "cluster", "hkmeans"} and len(sel) < 1200, "dedup must drop some candidates"
    assert sel["best_query_sim"].notna().sum() >= 40 and (sel["cluster"] >= 0).all()
    assert _outputs(gathered) == _outputs(sharded)
    assert not layout.retrieve_work(sharded).exists()


def test_sharded_retrieval_refuses_an_approximate_index(tmp_path):
    from dinov2.utils.config import ConfigError

    _world(tmp_path)
    cfg = RetrieveConfig(embedder=EMB, query_sets=CFG.query_sets, index=IndexConfig(kind="ivf_gemm"))
    with pytest.raises(ConfigError, match="retrieve.index.kind"):
        run_retrieve_sharded(tmp_path, cfg, ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                             progress=False, n_tasks=2)


def test_killed_sharded_retrieval_reruns_to_identical_output(tmp_path):
    """SIGKILL the sharded stage (local executor) once some search tasks wrote, rerun: same bytes
    as the gathered job."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    _world(ref)
    shutil.copytree(ref, out)
    run_retrieve(ref, CFG)
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); from test_curation_retrieve_shard import *; "
        "run_retrieve_sharded(sys.argv[1], CFG, ShardingConfig(mode='sharded'), "
        "ExecutorConfig(cluster='local', poll_interval_s=0.1), progress=False, n_tasks=4)")
    hits = layout.retrieve_work(out) / "hits"
    # kill once some blocks searched, nothing assigned
    rc = sigkill_when(["-c", script, str(out), str(Path(__file__).parent)], settle_s=1.0,
                      ready=lambda: hits.is_dir() and any(hits.glob("*.parquet")))
    assert rc == -signal.SIGKILL, "the run was not interrupted: the kill point came too late"
    assert not layout.retrieve_selection(out).exists() and (layout.retrieve_work(out) / "plan.json").is_file()
    run_retrieve_sharded(out, CFG, ShardingConfig(mode=Sharding.sharded), ExecutorConfig(cluster="debug"),
                         progress=False, n_tasks=4)
    assert _outputs(out) == _outputs(ref)


def test_an_approximate_index_still_serves_the_gathered_job():
    """``retrieve.index.kind: ivf_gemm`` keeps the approximate search (one job): nearly the exact picks."""
    from curation.retrieve import QuerySet, retrieve_core

    rng = np.random.default_rng(3)
    centres = rng.standard_normal((20, 16)).astype(np.float32)
    x = centres[rng.integers(0, 20, 3000)] + 0.3 * rng.standard_normal((3000, 16)).astype(np.float32)
    q = x[rng.choice(3000, 30, replace=False)] + 0.05 * rng.standard_normal((30, 16)).astype(np.float32)
    sets = [QuerySet("a", q, np.array([f"q{i:02d}" for i in range(30)], object))]
    qsc = [QuerySetConfig(name="a", method="sample", k=4)]
    exact = retrieve_core(x, None, sets, RetrieveConfig(query_sets=qsc))
    approx = retrieve_core(x, None, sets, RetrieveConfig(query_sets=qsc, index=IndexConfig(
        kind="ivf_gemm", gemm_list_size=100, nprobe=6, gemm_train_per_centroid=16)))
    a, b = exact.rows[exact.selected], approx.rows[approx.selected]
    assert 30 <= len(a) <= 120 and len(np.intersect1d(a, b)) >= 0.9 * len(a)
    assert np.isfinite(approx.best_query_sim[approx.selected]).all()
