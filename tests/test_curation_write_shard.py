"""The sharded write plan (curation/write_sharded.py) against the gathered one (curation/write.py):
the same plan rows (every row's fate, output shard and key), byte-identical shards and manifest, and a
killed sharded run that resumes to the same bytes."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import sigkill_when, write_all
from test_curation_write_audit import build_fixture

from curation import layout
from curation.jobs import ExecutorConfig
from curation.sharding import ShardingConfig
from curation.write import WriteConfig
from curation.write_plan import output_positions
from curation.write_sharded import decided_path, plan_block_path, run_write_sharded

CFG = WriteConfig(images_per_shard=2)
SEED = 3


def _final(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(layout.final_dir(out).iterdir())}


def _sharded(out: Path, writers: int = 2, blocks: int = 2) -> list[dict]:
    return run_write_sharded(out, CFG, SEED, ShardingConfig(mode="sharded", block_items=1),
                             ExecutorConfig(cluster="debug", write_tasks=writers), progress=False, n_tasks=blocks)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    """The write fixture (real photos in a tar and a folder, every stage's decisions) run gathered,
    plus an untouched copy of its inputs for sharded runs."""
    root = tmp_path_factory.mktemp("writeshard")
    fx = build_fixture(root)
    fresh = root / "fresh"
    shutil.copytree(fx["out"], fresh)
    write_all(fx["out"], CFG, seed=SEED)
    return {"gathered": fx["out"], "fresh": fresh, "root": root}


def _copy(pools, name: str) -> Path:
    out = pools["root"] / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(pools["fresh"], out)
    return out


def test_output_positions_are_a_permutation_evaluated_per_rank():
    for n in (1, 2, 3, 5, 16, 17, 1000, 4097):
        for seed in (0, 1, 7):
            pos = output_positions(np.arange(n), n, seed)
            assert np.array_equal(np.sort(pos), np.arange(n)), (n, seed)
            # any split into blocks of ranks gives the same positions (what the sharded place step does)
            cuts = sorted({0, n, n // 3, n // 2})
            parts = [output_positions(np.arange(a, b), n, seed) for a, b in zip(cuts[:-1], cuts[1:])]
            assert np.array_equal(np.concatenate(parts), pos)
    a, b = output_positions(np.arange(1000), 1000, 0), output_positions(np.arange(1000), 1000, 1)
    assert (a != b).mean() > 0.9 and (a != np.arange(1000)).mean() > 0.9  # seeded, and really shuffled
    assert np.array_equal(output_positions(np.arange(10), 10, 0, shuffle=False), np.arange(10))


@pytest.mark.parametrize("writers,blocks", [(2, 2), (3, 1)])
def test_sharded_write_equals_gathered(pools, writers, blocks):
    out = _copy(pools, f"sharded-{writers}-{blocks}")
    usage = _sharded(out, writers, blocks)
    assert {u["step"] for u in usage} == {"decide", "place", "write", "finalize"}
    assert sum(u["step"] == "decide" for u in usage) == blocks
    gathered = pq.read_table(layout.write_plan(pools["gathered"])).to_pandas()
    sharded = pq.read_table(layout.write_plan(out)).to_pandas()  # streamed from the plan blocks
    # every row's fate, output shard and key (one differing assignment fails here and in the tar bytes)
    pd.testing.assert_frame_equal(sharded, gathered)
    assert layout.write_plan(out).read_bytes() == layout.write_plan(pools["gathered"]).read_bytes()
    # the work files (decided blocks, writer pieces, plan blocks) are gone once the manifest is written
    assert not (out / "write" / "work").exists() and not plan_block_path(out, 0).parent.exists()
    assert gathered["output_shard"].notna().sum() == 6 and gathered["output_shard"].nunique() == 3
    assert _final(out) == _final(pools["gathered"])  # shards, manifest.parquet, summary.json: same bytes


def _kill_and_resume(pools, name: str, ready, slow: str) -> Path:
    out = _copy(pools, name)
    code = (
        "import sys, time\n"
        "import curation.write_sharded as w\n"
        f"orig = w.{slow}\n"
        f"def slow(*a, **k):\n    r = orig(*a, **k)\n    time.sleep(60)\n    return r\n"
        f"w.{slow} = slow\n"
        "from curation.jobs import ExecutorConfig\nfrom curation.sharding import ShardingConfig\n"
        "from curation.write import WriteConfig\n"
        f"w.run_write_sharded(sys.argv[1], WriteConfig(images_per_shard=2), {SEED}, ShardingConfig(mode='sharded'),"
        " ExecutorConfig(cluster='debug', write_tasks=2), progress=False, n_tasks=2)\n"
    )
    rc = sigkill_when(["-c", code, str(out)], lambda: ready(out), timeout_s=120)
    assert rc == -9, "the sharded write was not killed mid-run"
    assert not layout.manifest(out).is_file()
    _sharded(out)
    return out


def test_killed_sharded_plan_resumes_to_identical_bytes(pools):
    out = _kill_and_resume(pools, "killed-plan", lambda o: decided_path(o, 0, "json").is_file(), "atomic_write_json")
    assert _final(out) == _final(pools["gathered"])


def test_killed_sharded_shard_writer_resumes_to_identical_bytes(pools):
    def one_shard(o):
        return layout.write_shard_record(o, "lvd-000000.tar").parent.is_dir() and any(
            layout.write_shard_record(o, "x").parent.glob("*.json"))

    out = _kill_and_resume(pools, "killed-shards", one_shard, "write_one_shard")
    assert _final(out) == _final(pools["gathered"])
