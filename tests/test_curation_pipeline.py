"""`curate run` end to end on real photos: the bad-input corpus + a small synthetic crawl.

Embedder: a tiny random-init ViT (2 blocks, 56 px) saved in the official checkpoint
layout.  Runs the real CLI in subprocesses (cluster=debug in-process, and the submitit
LocalExecutor), SIGKILLs it mid-embed and mid-write, and checks the rerun's outputs
are identical to an uninterrupted run's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from badcorpus import make_bad_corpus
from conftest import sigkill_when

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "curation" / "tiny.yaml"
pytestmark = pytest.mark.slow


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import torch

    from curation.synth import CrawlSpec, build_crawl, load_photos
    from dinov2.models import build_model
    from dinov2.models.checkpoint import save_official

    root = tmp_path_factory.mktemp("curate")
    data = root / "data"
    expected = make_bad_corpus(data / "a_bad")  # sorted first → shards s000000..s000002
    photos = load_photos(limit=8, max_side=160)
    spec = CrawlSpec(n_base=24, n_eval_per_photo=2, n_query_per_photo=3, n_heldout_per_photo=1,
                     n_junk=3, images_per_shard=12, min_out_side=48, max_out_side=96)
    truth = build_crawl(photos, data / "b_synth", spec, seed=0)
    torch.manual_seed(0)
    # LayerScale 1.0 (not 1e-5): with near-zero residual branches a random-init CLS token ignores the image.
    model = build_model("vit_tiny", img_size=56, depth=2, init_values=1.0)
    ckpt = save_official(model, data / "vit_tiny_random.pth")
    overrides = [
        f"inputs=[{data / 'a_bad'}/*.tar,{data / 'b_synth' / 'crawl'}/*.tar]",
        f"eval_sets.photos=[{data / 'b_synth' / 'eval'}]",
        f"query_sets.q.inputs=[{data / 'b_synth' / 'query'}]",
        f"embedders.tiny.checkpoint={ckpt}",
    ]
    return {"root": root, "data": data, "expected": expected, "truth": truth, "overrides": overrides}


def curate(*args: str, check: bool = True, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "curation.cli", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} → {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def curate_inproc(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (no interpreter start-up): for runs that touch no model."""
    from curation.cli import main

    rc = main(list(args))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_cfg(world, out: Path, *extra: str) -> list[str]:
    return ["-c", str(TINY), f"output_dir={out}", *world["overrides"], *extra]


def _final(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "final").iterdir()) if p.suffix == ".tar" or p.name == "summary.json"}


@pytest.fixture(scope="module")
def reference(world):
    out = world["root"] / "ref"
    before = _tree(world["data"])
    proc = curate("run", *run_cfg(world, out, "executor.cluster=debug", "--no-progress"))
    assert _tree(world["data"]) == before, "the run wrote into its input folders"
    assert sorted(p.name for p in world["root"].iterdir()) == ["data", "ref"], "wrote outside OUT"
    return {"out": out, "stdout": proc.stdout}


def test_bad_corpus_through_curate_run(world, reference):
    out = reference["out"]
    assert "funnel" in reference["stdout"] and "audit of" in reference["stdout"]
    manifest = pq.read_table(out / "final" / "manifest.parquet").to_pandas().set_index("id")
    for rid, reason in world["expected"].items():
        assert rid in manifest.index, f"{rid} missing from the manifest"
        row = manifest.loc[rid]
        if reason == "ok":
            assert row["stage"] != "embed", (rid, row["reason"])
        else:
            assert (row["decision"], row["stage"], row["reason"]) == ("dropped", "embed", reason), rid
    # Every synthetic crawl image is there too, and junk was dropped at embed.
    crawl = manifest[manifest["input_path"].str.contains("b_synth")]
    n_crawl = len(world["truth"]["items"])
    assert len(crawl) == n_crawl
    summary = json.loads((out / "final" / "summary.json").read_text())
    f = summary["funnel"]
    assert f["inputs"] == len(manifest) and f["written"] > 0
    assert f["inputs"] > f["decoded"] >= f["after_dedup"] >= f["after_decontamination"] >= f["retrieved"] >= f["written"]
    assert f["decoded"] > f["after_dedup"], "planted exact copies must be removed"
    assert f["after_dedup"] >= 0.5 * f["decoded"], "random features must not merge distinct photos"
    # auto retrieval is sample-based for this small pool (curation/retrieval_plan.py), so it selects
    assert summary["retrieval"]["per_set"]["q"]["method"] == "sample"
    assert (out / "config.yaml").is_file() and (out / "final" / "audit.txt").read_text().startswith(f"audit of {out}: PASS")
    assert any((out / "logs" / "embed").iterdir())


def test_audit_cli(world, reference, tmp_path, capsys):
    out = reference["out"]
    rc, stdout, _ = curate_inproc(capsys, "audit", str(out))
    assert rc == 0 and "PASS" in stdout
    # Copy the final folder, drop one manifest row: the audit must fail and name it.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = pq.read_table(bad / "final" / "manifest.parquet")
    victim = m.column("id")[0].as_py()
    pq.write_table(m.slice(1), bad / "final" / "manifest.parquet")
    rc, stdout, _ = curate_inproc(capsys, "audit", str(bad))
    assert rc == 1 and victim in stdout and "FAIL" in stdout


def test_kill_and_rerun_equals_uninterrupted(world, reference):
    out = world["root"] / "killed"
    args = run_cfg(world, out, "executor.cluster=debug", "--no-progress")
    embed_dir = out / "embed" / "pool"
    rc1 = sigkill_when(["-m", "curation.cli", "run", *args],
                       lambda: embed_dir.is_dir() and len(list(embed_dir.glob("*.parquet"))) >= 2)
    shards = out / "write" / "shards"
    rc2 = sigkill_when(["-m", "curation.cli", "run", *args],
                       lambda: shards.is_dir() and len(list(shards.glob("*.json"))) >= 2)
    print("kill return codes:", rc1, rc2)
    assert -signal.SIGKILL in (rc1, rc2), "neither run was interrupted: the kill points came too late"
    # Finish (different task grouping: results must not depend on it).
    curate("run", *run_cfg(world, out, "executor.cluster=debug", "executor.shards_per_task=2",
                           "executor.write_tasks=2", "--no-progress"))
    ref = _final(reference["out"])
    got = _final(out)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name] == ref[name], f"{name} differs from the uninterrupted run"
    m_ref = pq.read_table(reference["out"] / "final" / "manifest.parquet").to_pandas()
    m_got = pq.read_table(out / "final" / "manifest.parquet").to_pandas()
    pd.testing.assert_frame_equal(m_ref, m_got)
    assert not list((out / "final").glob(".*.tmp"))


def test_sharded_dedup_run_equals_gathered(world, reference):
    """`curate run sharding.mode=sharded` on the local executor: dedup, decontamination and retrieval as
    job arrays (one task per block of embed shards); decisions, selection, manifest and shards
    byte-identical to the gathered run."""
    out = world["root"] / "sharded"
    proc = curate("run", *run_cfg(world, out, "executor.cluster=local", "sharding.mode=sharded",
                                  "sharding.block_items=10", "--no-progress"),
                  timeout=900)  # ~25 local task processes: 300 s was too short on a loaded 2-core machine
    assert "dedup: sharded map → reduce" in proc.stdout
    searched = list((out / "logs" / "dedup" / "search").glob("*_result.pkl"))
    assert len(searched) >= 4, f"expected >= 4 search tasks, found {len(searched)}"
    ref = reference["out"]
    assert (out / "dedup" / "decisions.parquet").read_bytes() == (ref / "dedup" / "decisions.parquet").read_bytes()
    assert "retrieve: sharded search / assign arrays" in proc.stdout
    assert len(list((out / "logs" / "retrieve" / "search").glob("*_result.pkl"))) >= 4
    for name in ("selection.parquet", "clusters.json"):
        assert (out / "retrieve" / name).read_bytes() == (ref / "retrieve" / name).read_bytes(), name
    assert "write: sharded plan → shards → manifest" in proc.stdout
    assert len(list((out / "logs" / "write" / "decide").glob("*_result.pkl"))) >= 2  # the plan joined per block
    assert (out / "write" / "plan.parquet").read_bytes() == (ref / "write" / "plan.parquet").read_bytes()
    assert (out / "final" / "manifest.parquet").read_bytes() == (ref / "final" / "manifest.parquet").read_bytes()
    assert _final(out) == _final(reference["out"])


def test_changed_config_is_refused(world, reference, capsys):
    out = reference["out"]
    rc, _, err = curate_inproc(capsys, "run", *run_cfg(world, out, "dedup.threshold=0.5"))
    assert rc == 2 and "dedup.threshold" in err and "already ran" in err and "dedup.dedup" not in err
    rc, _, err = curate_inproc(capsys, "write", *run_cfg(world, out, "write.images_per_shard=3"))
    assert rc == 2 and "write.images_per_shard" in err
    # Executor settings do not change results: accepted, and every stage is skipped.
    rc, stdout, _ = curate_inproc(capsys, "run", *run_cfg(world, out, "executor.cluster=local",
                                                          "executor.shards_per_task=3", "embedders.tiny.batch_size=7",
                                                          "embed.num_workers=2", "--no-audit"))
    assert rc == 0 and stdout.count("already complete") == 5


def test_config_errors_name_the_key(world, tmp_path, capsys):
    for override, words in [
        ("dedup.treshold=0.5", ["dedup.treshold"]),
        ("dedup.embedder=nope", ["dedup.embedder", "nope"]),
        ("executor.cluster=auto", ["executor.cluster"]),
        ("embedders.tiny.image_size=big", ["embedders.tiny.image_size"]),
        ("embedders.tiny.colour=1", ["embedders.tiny.colour"]),
    ]:
        rc, _, err = curate_inproc(capsys, "run", *run_cfg(world, tmp_path / "o", override))
        assert rc == 2 and all(w in err for w in words), (override, err)
    rc, _, err = curate_inproc(capsys, "embed", "-c", str(TINY), f"output_dir={tmp_path / 'o'}",
                               "inputs=[/nonexistent/x.tar]", *world["overrides"][1:])
    assert rc == 2 and "/nonexistent/x.tar" in err
    assert not (tmp_path / "o").exists(), "a refused config must not create the output folder"


def test_written_shards_load_in_trainer_loader(world, reference):
    from collections import Counter

    from dinov2.data.augment import CropsConfig
    from dinov2.data.loader import DataConfig, SourceConfig, build_train_loader
    from dinov2.data.webdataset import iter_tar_samples

    out = reference["out"]
    summary = json.loads((out / "final" / "summary.json").read_text())
    n = len(summary["shards"])
    counters: Counter = Counter()
    samples = [s for sh in summary["shards"] for s in iter_tar_samples(str(out / "final" / sh["name"]), counters)]
    assert len(samples) == summary["funnel"]["written"] and not counters
    # The training loader reads them through a brace pattern, decodes and multi-crops them.
    pattern = str(out / "final" / f"lvd-{{000000..{n - 1:06d}}}.tar")
    cfg = DataConfig(sources=[SourceConfig(pattern=pattern, weight=1.0)], batch_size=4, num_workers=0,
                     streams_per_rank=1, shuffle_buffer=4,
                     crops=CropsConfig(global_crops_size=28, local_crops_number=2, local_crops_size=14),
                     patch_size=14)
    loader = build_train_loader(cfg)
    batch = next(iter(loader))
    assert tuple(batch["collated_global_crops"].shape) == (8, 3, 28, 28)
    assert sum(loader.bad_sample_counts().values()) == 0


def _copy_out(reference, tmp_path: Path) -> Path:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(reference["out"], out)
    return out


def test_deleted_embed_shard_is_noticed_and_recomputed(world, reference, tmp_path):
    """As docs/curation.md says to recompute: delete one embed Parquet plus the later stages."""
    import shutil

    out = _copy_out(reference, tmp_path)
    victim = sorted((out / "embed" / "pool").glob("*.parquet"))[1]
    victim.unlink()
    for stage in ("dedup", "decontaminate", "retrieve", "write", "final"):
        shutil.rmtree(out / stage)
    proc = curate("run", *run_cfg(world, out, "executor.cluster=debug", "--no-progress"))
    assert f"{victim} is missing" in proc.stdout
    assert victim.is_file()
    assert _final(out) == _final(reference["out"])
    assert "PASS" in (out / "final" / "audit.txt").read_text()


def test_deleted_final_shard_or_matrix_is_rewritten(world, reference, tmp_path, capsys):
    out = _copy_out(reference, tmp_path)
    shard = sorted((out / "final").glob("*.tar"))[0]
    shard.unlink()
    rc, stdout, _ = curate_inproc(capsys, "write", *run_cfg(world, out, "executor.cluster=debug", "--no-progress"))
    assert rc == 0 and f"{shard} is missing" in stdout
    assert _final(out) == _final(reference["out"])
    # A lost embedding matrix marks embed incomplete, and so every later stage.
    npy = sorted((out / "embed" / "pool").glob("*.npy"))[0]
    npy.unlink()
    rc, stdout, err = curate_inproc(capsys, "write", *run_cfg(world, out, "executor.cluster=debug", "--no-progress"))
    assert rc == 2 and "needs 'embed'" in err and npy.name in stdout


def test_second_run_into_a_busy_output_folder_is_refused(world, reference, tmp_path, capsys):
    from dinov2.utils.lock import FolderLock

    out = _copy_out(reference, tmp_path)
    before = _tree(out)
    with FolderLock(out, "curate"):
        rc, _, err = curate_inproc(capsys, "run", *run_cfg(world, out, "--no-progress"))
    assert rc == 2 and "in use by pid" in err and len(err.strip().splitlines()) == 1
    after = _tree(out)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_curated_files_respect_the_umask(reference):
    mask = os.umask(0o022)
    os.umask(mask)
    for p in [reference["out"] / "final" / "manifest.parquet", *sorted((reference["out"] / "final").glob("*.tar"))]:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_summary_has_warnings_list(reference):
    summary = json.loads((reference["out"] / "final" / "summary.json").read_text())
    assert isinstance(summary["warnings"], list)
