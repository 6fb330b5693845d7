"""FAISS index choice, IVF vs exact agreement, k-means, and the embed-output store (curation/index.py, store.py)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import write_embed_shard

from curation.dedup import knn_graph
from curation.index import IndexConfig, build_index
from curation.index_plan import gpu_available, plan_index, use_gpu
from curation.kmeans import assign, kmeans, kmeans_array
from curation.store import (
    EmbeddingStore,
    ShardedVectors,
    StoreError,
    list_sources,
    resolve_embedder,
)
from dinov2.utils.config import ConfigError


def clustered(n: int, d: int = 64, n_clusters: int = 40, seed: int = 0, spread=(0.5, 1.5)) -> np.ndarray:
    """Mixture of gaussians on the sphere (like real embeddings: dense modes, varied spread)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    lab = rng.integers(0, n_clusters, n)
    spread = rng.uniform(*spread, n_clusters)
    x = centres[lab] + spread[lab, None] * rng.standard_normal((n, d)) / math.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_plan_index_sizes():
    cfg = IndexConfig()
    assert plan_index(50_000, 384, cfg).kind == "flat"
    for n in (100_000, 1_000_000):  # CPU default: GEMM-blocked IVF with ~gemm_list_size rows per list
        p = plan_index(n, 384, cfg)
        assert p.kind == "ivf_gemm" and p.nlist == round(n / cfg.gemm_list_size) and p.nprobe == cfg.nprobe
        assert p.n_train == p.nlist * cfg.gemm_train_per_centroid
    for n in (100_000, 1_000_000, 10_000_000):  # GPU: FAISS IVF sized by √N
        p = plan_index(n, 384, cfg, gpu=True)
        assert p.kind in ("ivf", "ivfpq")
        assert 4 * math.sqrt(n) - 1 <= p.nlist <= 16 * math.sqrt(n) + 1
        assert 30 * p.nlist <= p.n_train <= 256 * p.nlist or p.n_train == n
    assert plan_index(10_000_000, 384, cfg).kind == "ivfpq"  # 15 GB of float32 > 8 GB budget
    pq = plan_index(10_000_000, 384, cfg)
    assert 384 % pq.pq_m == 0 and pq.pq_m == 48
    assert plan_index(200_000, 384, IndexConfig(kind="flat")).kind == "flat"
    assert plan_index(1000, 384, IndexConfig(kind="ivf", nlist=10)).nlist == 10
    # ivf_gemm queries per pass over the lists: auto reads the lists ~16 times, within memory bounds
    gemm = IndexConfig(kind="ivf_gemm")
    assert [plan_index(n, 256, gemm).query_batch for n in (200_000, 1_000_000, 10_000_000, 10**9)] == [
        65_536, 65_536, 625_000, 2_097_152]
    assert plan_index(10**9, 256, IndexConfig(kind="ivf_gemm", gemm_query_batch=1000)).query_batch == 1000
    with pytest.raises(ConfigError, match="gemm_query_batch"):
        IndexConfig(gemm_query_batch=-1).validate()


def test_gpu_setting_on_cpu_machine():
    assert use_gpu("never") is False
    if not gpu_available():
        assert use_gpu("auto") is False
        with pytest.raises(RuntimeError, match="no GPU"):
            use_gpu("always")


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_ivf_agrees_with_flat(kind):
    x = clustered(4_000)
    q = x[:300]
    flat = build_index(x, IndexConfig(kind="flat"))
    ivf = build_index(x, IndexConfig(kind=kind, nprobe=16, pq_m=16, nlist=64))  # 16 bytes per 64-d vector
    assert ivf.plan.kind == kind and ivf.ntotal == len(x)
    _fs, fi = flat.search(q, 10)
    _vs, vi = ivf.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fi.tolist(), vi.tolist())])
    assert fi[:, 0].tolist() == list(range(300))  # self is the nearest neighbour
    print(f"\n{kind} recall@10 vs flat: {recall:.3f}")
    assert recall >= (0.9 if kind == "ivf" else 0.5)  # PQ distances are approximate
    # masked index answers in global rows
    mask = np.zeros(len(x), bool)
    mask[::2] = True
    m = build_index(x, IndexConfig(kind=kind), mask)
    _, mi = m.search(q, 5)
    assert (mi[mi >= 0] % 2 == 0).all()


def test_knn_graph_ivf_matches_flat_edges():
    x = clustered(4_000, seed=1, spread=(1.0, 2.0))
    rng = np.random.default_rng(1)
    dup = x[:300] + 0.1 * rng.standard_normal((300, x.shape[1])).astype(np.float32) / 8  # cos ≈ 0.995
    x = np.concatenate([x, dup / np.linalg.norm(dup, axis=1, keepdims=True)])
    g_flat = knn_graph(x, 16, 0.9, index_cfg=IndexConfig(kind="flat"))
    for kind, floor in (("ivf", 0.99), ("ivfpq", 0.95)):
        g = knn_graph(x, 16, 0.9, index_cfg=IndexConfig(kind=kind, pq_m=16, nlist=64))
        exact = set(zip(g_flat.a.tolist(), g_flat.b.tolist()))
        got = set(zip(g.a.tolist(), g.b.tolist()))
        assert len(exact) >= 600
        assert len(exact & got) / len(exact) >= floor, kind
        assert got <= exact | {(b, a) for a, b in exact}  # PQ edges re-scored exactly: no false edges
        assert np.all(g.sim >= 0.9)


def test_kmeans_seeded_and_two_level():
    x = clustered(6000, n_clusters=20)
    c1 = kmeans(x, 20, seed=3)
    c2 = kmeans(x, 20, seed=3)
    assert np.array_equal(c1, c2)
    assert np.allclose(np.linalg.norm(c1, axis=1), 1, atol=1e-5)
    rows, labels, sims = assign(x, c1)
    assert rows.tolist() == list(range(6000)) and labels.max() < 20 and (sims > 0).mean() > 0.95
    # two-level k-means (used for large IVF nlist) gives exactly k centroids, near flat k-means quality
    c_two = kmeans_array(x, 100, niter=10, seed=0, two_level_min_k=50)
    c_flat = kmeans_array(x, 100, niter=10, seed=0, two_level_min_k=10**9)
    assert c_two.shape == (100, x.shape[1])
    q_two = assign(x, c_two)[2].mean()
    q_flat = assign(x, c_flat)[2].mean()
    assert q_two >= q_flat - 0.03
    with pytest.raises(ValueError):
        kmeans_array(x[:5], 10)


def test_store_reads_layout_memmapped_and_skips_bad_shards(tmp_path):
    rng = np.random.default_rng(0)
    e0 = rng.standard_normal((5, 8)).astype(np.float32)
    e1 = rng.standard_normal((3, 8)).astype(np.float32)
    recs0 = pd.DataFrame({"key": [f"a.{i}" for i in range(5)], "width": 10, "height": 20})
    recs1 = pd.DataFrame({"key": ["x", "bad", "y", "z"], "status": ["ok", "error", "ok", "ok"]})
    write_embed_shard(tmp_path, "pool", "s000000", recs0, {"m": e0})
    write_embed_shard(tmp_path, "pool", "s000001", recs1, {"m": e1})
    # a shard whose embeddings do not match its parquet is skipped, not fatal
    write_embed_shard(tmp_path, "pool", "s000002", pd.DataFrame({"key": ["q"]}), {"m": e1[:1]})
    np.save(tmp_path / "embed" / "pool" / "s000002.m.npy", np.zeros((4, 8), np.float16))
    write_embed_shard(tmp_path, "eval-foo", "s000000", pd.DataFrame({"key": ["e"]}), {"m": e1[:1]})
    assert list_sources(tmp_path) == ["eval-foo", "pool"]
    assert list_sources(tmp_path, "eval-") == ["eval-foo"]
    assert resolve_embedder(tmp_path, "pool") == "m"
    store = EmbeddingStore(tmp_path, "pool", "m")
    assert store.n == 8 and store.dim == 8
    assert store.ids.tolist() == [f"pool/s000000/a.{i}" for i in range(5)] + [
        "pool/s000001/x", "pool/s000001/y", "pool/s000001/z"]
    assert [p.shard_id for p in store.problems] == ["s000002"]
    full = np.concatenate([e0, e1])
    full /= np.linalg.norm(full, axis=1, keepdims=True)
    got = store.vectors.load_all()
    assert np.allclose(got, full, atol=2e-3)  # float16 storage
    assert np.allclose(store.vectors.gather(np.array([7, 0, 5])), full[[7, 0, 5]], atol=2e-3)
    assert isinstance(store.vectors, ShardedVectors)
    assert isinstance(store.vectors._mmap(0), np.memmap)  # read through memory maps
    blocks = list(store.vectors.iter_blocks(2))
    assert np.concatenate([r for r, _ in blocks]).tolist() == list(range(8))
    with pytest.raises(StoreError):
        EmbeddingStore(tmp_path, "query-missing", "m")
    with pytest.raises(StoreError, match="cannot infer"):
        resolve_embedder(tmp_path, "nothing")


def _with_near_dups(n: int, n_dup: int, seed: int) -> np.ndarray:
    x = clustered(n - n_dup, n_clusters=60, seed=seed, spread=(0.8, 1.6))
    rng = np.random.default_rng(seed + 1)
    src = rng.choice(len(x), n_dup, replace=False)
    dup = x[src] + rng.uniform(0.05, 0.4, (n_dup, 1)) * rng.standard_normal((n_dup, x.shape[1])) / 8
    dup /= np.linalg.norm(dup, axis=1, keepdims=True)
    return np.concatenate([x, dup.astype(np.float32)])


def test_ivf_gemm_recall_vs_flat_and_near_dup_edges():
    x = _with_near_dups(20_000, 1_000, seed=3)
    cfg = IndexConfig(kind="ivf_gemm", gemm_list_size=250, nprobe=8)
    index = build_index(x, cfg)
    assert index.plan.kind == "ivf_gemm" and index.plan.nlist == 80 and index.ntotal == len(x)
    flat = build_index(x, IndexConfig(kind="flat"))
    q = x[::10]
    _fs, fi = flat.search(q, 10)
    gs, gi = index.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(fi.tolist(), gi.tolist())])
    print(f"\nivf_gemm recall@10 vs flat: {recall:.4f}")
    assert recall >= 0.95
    assert np.all(np.diff(gs, axis=1) <= 0)  # sorted by similarity
    # exact similarities: scores are plain inner products of the returned rows
    np.testing.assert_allclose(gs[:, 1], np.einsum("ij,ij->i", q, x[gi[:, 1]]), atol=1e-5)
    # the self-search path (list-ordered blocks) answers like search()
    got = {}
    for qrows, sims, nbrs in index.search_vectors(x, 10):
        for r, row in zip(qrows.tolist(), nbrs.tolist()):
            got[r] = row
    assert sorted(got) == list(range(len(x)))
    assert all(got[r] == row for r, row in zip(range(0, len(x), 10), gi.tolist()))
    # near-duplicate edges (cos >= 0.9) of the dedup graph vs exact search
    g_flat = knn_graph(x, 64, 0.9, index_cfg=IndexConfig(kind="flat"))
    g = knn_graph(x, 64, 0.9, index_cfg=cfg)
    assert g.index_kind == "ivf_gemm"
    exact = set(zip(g_flat.a.tolist(), g_flat.b.tolist()))
    ours = set(zip(g.a.tolist(), g.b.tolist()))
    assert len(exact) >= 1_900 and ours <= exact  # ~2 directed edges per planted pair
    print(f"near-dup edge recall: {len(exact & ours) / len(exact):.4f}")
    assert len(exact & ours) / len(exact) >= 0.99


def test_ivf_gemm_deterministic_across_threads_masked_and_memmapped(tmp_path):
    import torch

    x = _with_near_dups(6_000, 300, seed=5)
    x[100] = x[200]  # exact duplicates: equal scores break by row id
    np.save(tmp_path / "a.npy", x[:2500].astype(np.float16))
    np.save(tmp_path / "b.npy", x[2500:].astype(np.float16))
    vectors = ShardedVectors([tmp_path / "a.npy", tmp_path / "b.npy"])
    mask = np.ones(len(x), bool)
    mask[::7] = False
    cfg = IndexConfig(kind="ivf_gemm", gemm_list_size=100, nprobe=6, search_batch=1000, gemm_query_batch=1000)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            index = build_index(vectors, cfg, mask)
            blocks = list(index.search_vectors(vectors, 12, mask))
            rows = np.concatenate([b[0] for b in blocks])
            order = np.argsort(rows)
            results.append((rows[order], np.concatenate([b[1] for b in blocks])[order],
                            np.concatenate([b[2] for b in blocks])[order]))
    finally:
        torch.set_num_threads(threads)
    (r1, s1, n1), (r2, s2, n2) = results
    assert np.array_equal(r1, np.flatnonzero(mask)) and np.array_equal(r1, r2)
    assert np.array_equal(n1, n2)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    assert np.all(mask[n1[n1 >= 0]])  # masked-out rows are never returned
    i100 = np.searchsorted(r1, 100)
    assert n1[i100, 0] == 100 and n1[i100, 1] == 200  # tie (identical vectors) → smaller row first
    i200 = np.searchsorted(r1, 200)
    assert n1[i200, 0] == 100 and n1[i200, 1] == 200
    # more neighbours than exist: padded with -1 / -inf
    small = build_index(x[:50], IndexConfig(kind="ivf_gemm", gemm_list_size=10, nprobe=2))
    s, nb = small.search(x[:3], 60)
    assert s.shape == (3, 60) and (nb[:, -1] == -1).all() and np.isneginf(s[:, -1]).all()


def test_gather_by_positioned_reads_equals_the_memory_map(tmp_path):
    """Random, repeated, sorted, dense and sparse row sets over shards (one empty) give the rows the
    memory map holds, bit for bit, in the asked order; runs longer than one read are split."""
    from curation.store import ShardedVectors, normalize_rows

    rng = np.random.default_rng(0)
    arrs = [rng.standard_normal((n, 24)).astype(np.float16) for n in (1000, 0, 5000, 37)]
    paths = []
    for i, a in enumerate(arrs):
        paths.append(tmp_path / f"{i}.npy")
        np.save(paths[-1], a)
    v = ShardedVectors(paths)
    full = np.concatenate(arrs).astype(np.float32)
    for rows in (rng.integers(0, v.n, 3000), np.arange(v.n), rng.permutation(v.n)[:10],
                 np.array([5, 5, 5, v.n - 1]), rng.integers(0, v.n, 50000)):
        assert np.array_equal(v.gather(rows), normalize_rows(full[rows]))
    assert np.array_equal(v._read_rows(2, np.arange(0, 5000, 3), max_run=7), arrs[2][::3])
