"""numpy scoring of the curation searches (curation/topk.py, curation/gemm_ivf.py): exact top-k under
the tie rule, and no torch in the processes of the sharded dedup / decontamination / retrieval."""
from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from curation import topk
from curation.gemm_ivf import CoarseQuantizer, GemmIvfIndex
from curation.index_plan import IndexConfig, plan_index
from curation.store import as_vectors

REPO = Path(__file__).resolve().parents[1]


def _reference(s: np.ndarray, k: int, key: np.ndarray | None = None) -> np.ndarray:
    """Brute force: the k first columns per row under (value desc, key asc), as sorted column lists."""
    key = np.broadcast_to(np.arange(s.shape[1]), s.shape) if key is None else key
    first = np.lexsort((key, -s), axis=-1)[:, :k]
    return np.sort(first, axis=1)


@pytest.mark.parametrize("k", [1, 3, 7, 19, 20, 25])
def test_top_k_equals_brute_force_with_ties(k):
    rng = np.random.default_rng(k)
    s = rng.integers(0, 4, size=(300, 20)).astype(np.float32)  # four values: ties everywhere
    s[rng.random(s.shape) < 0.1] = -np.inf
    s[:5] = 1.0  # whole rows equal
    got = topk.top_k(s, k, chunk=64)  # several row chunks
    assert got.shape == (300, min(k, 20))
    assert np.array_equal(got, _reference(s, k))
    key = np.argsort(rng.random((300, 20)), axis=1).astype(np.int64)  # a per-row tie key
    got = topk.top_k(s, k, key=lambda rows: key[rows], chunk=64)
    assert np.array_equal(got, _reference(s, k, key))


@pytest.mark.parametrize("seed", range(6))
def test_top_k_of_few_in_many_columns_equals_brute_force(seed):
    """k << m takes the group-maximum threshold path: same columns as the reference, ties and -inf included."""
    rng = np.random.default_rng(seed)
    m = int(rng.integers(700, 3000))
    s = rng.integers(0, [3, 20, 1000, 2, 7, 50][seed], size=(60, m)).astype(np.float32)
    s[rng.random(s.shape) < 0.2] = -np.inf
    for k in (1, 2, 5, m // 64):
        assert np.array_equal(topk.top_k(s, k, chunk=m * 7), _reference(s, k))


def test_top_k_of_distinct_values_and_sort_desc():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((50, 1000)).astype(np.float32)
    j = topk.top_k(s, 10)
    assert np.array_equal(j, np.sort(np.argsort(-s, axis=1)[:, :10], axis=1))
    v = np.take_along_axis(s, j, 1)
    o = topk.sort_desc(v, j)
    assert np.array_equal(np.take_along_axis(j, o, 1), np.argsort(-s, axis=1)[:, :10])


@pytest.mark.parametrize("seed", range(4))
def test_select_k_takes_the_columns_of_top_k(seed):
    """Same set as :func:`top_k` (ties by column, or by key), in any order; plain rows and tied rows mixed."""
    rng = np.random.default_rng(seed)
    s = rng.standard_normal((300, 130)).astype(np.float32)
    s[::3] = rng.integers(0, 4, (100, 130)).astype(np.float32)  # many ties at the k-th value
    key = rng.permutation(300 * 130).reshape(300, 130)
    for k in (1, 7, 65, 129, 130, 200):
        got = np.sort(topk.select_k(s, k), axis=1)
        assert np.array_equal(got, topk.top_k(s, k))
        got = np.sort(topk.select_k(s, k, key=lambda rows: key[rows]), axis=1)
        assert np.array_equal(got, topk.top_k(s, k, key=lambda rows: key[rows]))
    s[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        topk.select_k(s, 10)


def test_top_k_refuses_nan():
    s = np.zeros((2, 5), np.float32)
    s[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        topk.top_k(s, 2)


def test_similarities_of_one_buffer_equal_the_general_gemm():
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)
    assert np.array_equal(topk.similarities(x, x), x @ x.copy().T)


def _tied_pool(n: int, seed: int) -> np.ndarray:
    """Unit vectors with four entries 0.5 in eight: every cosine is a multiple of 1/4, exact in float32."""
    patterns = np.array([[0.5 if i in c else 0.0 for i in range(8)] for c in itertools.combinations(range(8), 4)],
                        np.float32)
    return patterns[np.random.default_rng(seed).integers(0, len(patterns), n)]


def test_coarse_quantizer_probes_break_ties_by_centroid():
    c = _tied_pool(30, 1)
    q = _tied_pool(40, 2)
    dq, iq = CoarseQuantizer(c, batch=16).search(q, 5)
    ref = np.lexsort((np.broadcast_to(np.arange(30), (40, 30)), -(q @ c.T)), axis=-1)[:, :5]
    assert np.array_equal(iq, ref) and np.array_equal(dq, np.take_along_axis(q @ c.T, ref, 1))


@pytest.mark.parametrize("query_batch", [16, 4096])
def test_gemm_ivf_search_is_exact_under_similarity_then_row_with_ties(query_batch):
    """Probing every list, the IVF equals brute force under (similarity desc, row asc), though the pool is
    full of equal scores within and across lists — whether a pass over the lists serves few queries or all."""
    x = _tied_pool(600, 0)
    q = _tied_pool(50, 3)
    cfg = IndexConfig(kind="ivf_gemm", gemm_list_size=40, nprobe=1000, search_batch=16,
                      gemm_query_batch=query_batch, gemm_train_per_centroid=20)
    plan = plan_index(len(x), 8, cfg, gpu=False)
    assert plan.kind == "ivf_gemm" and plan.nprobe == plan.nlist > 1
    index = GemmIvfIndex.build(as_vectors(x), np.arange(len(x)), plan, cfg, None)
    sims, rows = index.search(q, 12)
    exact = q @ x.T
    ref = np.lexsort((np.broadcast_to(np.arange(len(x)), exact.shape), -exact), axis=-1)[:, :12]
    assert np.array_equal(rows, ref) and np.array_equal(sims, np.take_along_axis(exact, ref, 1))
    # self-search in list order: every row answers the same as a plain search of it
    for qrows, s, r in index.search_vectors(x, 12):
        e = x[qrows] @ x.T
        ref = np.lexsort((np.broadcast_to(np.arange(len(x)), e.shape), -e), axis=-1)[:, :12]
        assert np.array_equal(r, ref) and np.array_equal(s, np.take_along_axis(e, ref, 1))


NO_TORCH = r"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(sys.argv[1]) / "tests"))
out = Path(sys.argv[2])
import test_curation_retrieve_shard as rs
import test_curation_shard as ds
from curation.choices import Sharding
from curation.dedup import run_dedup
from curation.dedup_sharded import run_dedup_sharded, task_baseline
from curation.decontaminate import DecontamConfig, run_decontaminate
from curation.decontaminate_sharded import run_decontaminate_sharded
from curation.retrieve import run_retrieve
from curation.retrieve_sharded import run_retrieve_sharded
from curation.jobs import ExecutorConfig
from curation.sharding import ShardingConfig

ex, sh = ExecutorConfig(cluster="debug"), ShardingConfig(mode=Sharding.sharded)
task_baseline(1)
for kind in ("ivf_gemm", "flat"):
    ds._pool(out / kind)
    run_dedup(out / kind, ds.CONFIGS[kind])
    run_dedup_sharded(out / kind, ds.CONFIGS[kind], sh, ex, progress=False, n_tasks=3)
import numpy as np
import pandas as pd
from conftest import write_embed_shard
from curation import layout

ev = np.load(layout.embed_npy(out / "flat", "pool", layout.shard_id(0), "e"))[:20].astype(np.float32)
write_embed_shard(out / "flat", "eval-x", layout.shard_id(0), pd.DataFrame({"key": [f"e{i}" for i in range(20)]}),
                  {"e": ev})
cfg = DecontamConfig(embedder="e", threshold=0.9)
run_decontaminate(out / "flat", cfg)
run_decontaminate_sharded(out / "flat", cfg, sh, ex, progress=False, n_tasks=3)
rs._world(out / "r")
run_retrieve(out / "r", rs.CFG)
run_retrieve_sharded(out / "r", rs.CFG, sh, ex, progress=False, n_tasks=3)
print("torch imported:", "torch" in sys.modules)
"""


def test_sharded_search_tasks_never_import_torch(tmp_path):
    """The map tasks' code (train, assign, search, reduce, match, retrieval) run in a fresh interpreter
    leaves torch unimported: a task process does not pay torch's ~0.5 GB (bench/RESULTS.md)."""
    res = subprocess.run([sys.executable, "-c", NO_TORCH, str(REPO), str(tmp_path)], capture_output=True,
                         text=True, timeout=600, cwd=REPO, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "torch imported: False" in res.stdout, res.stdout[-2000:]


def test_gemm_ivf_refuses_a_plan_without_a_query_batch():
    """A pass size of 0 would fail deep inside the first search (range step 0): refused when the index is made."""
    from curation.index_plan import IndexPlan

    plan = IndexPlan("ivf_gemm", nlist=2, nprobe=1)
    with pytest.raises(ValueError, match="query batch"):
        GemmIvfIndex(np.eye(2, 8, dtype=np.float32), None, np.array([0, 0, 0]), plan, IndexConfig(), None, None)
