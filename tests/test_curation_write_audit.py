"""Write (stage 5) and audit (stage 6) on hand-built stage outputs over real photos.

The embed/dedup/decontaminate/retrieve outputs are written here directly in the
ARCHITECTURE.md layout, so these tests exercise the writer and auditor alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import write_all as write_stage
from PIL import Image

from curation.audit import audit
from curation.write import (
    WriteConfig,
    build_plan,
    finalize_write,
    plan_write,
    write_shards,
)
from dinov2.utils.io import atomic_write_parquet


def _photos() -> list[Image.Image]:
    import skimage.data

    names = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "brick", "grass"]
    out = []
    for n in names:
        img = Image.fromarray(getattr(skimage.data, n)()).convert("RGB")
        img.thumbnail((96, 96))
        out.append(img)
    return out


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _embed_row(source, shard_id, input_path, member, key, ext, data, offset, status="ok", reason=None, emb_row=0):
    return {
        "id": f"{source}/{shard_id}/{key}", "source": source, "shard_id": shard_id,
        "input_path": str(input_path), "member": member, "key": key, "ext": ext,
        "url": f"https://example.com/{key}.{ext}", "caption": f"caption {key}",
        "sha256": hashlib.sha256(data).hexdigest(), "phash": 0, "width": 96, "height": 64,
        "orig_mode": "RGB", "status": status, "reason": reason, "detail": None,
        "emb_row": emb_row if status == "ok" else -1, "byte_offset": offset, "byte_size": len(data),
    }


def build_fixture(root: Path) -> dict:
    """A tar shard + a folder shard of real photos, embed parquets, and decisions.

    Returns the expected fate of every id.
    """
    photos = _photos()
    inputs = root / "inputs"
    inputs.mkdir(parents=True)
    out = root / "out"
    rows = []
    # Shard s000000: a tar with 7 photos (dotted key too) + one corrupt member.
    tar_path = inputs / "00000.tar"
    with tarfile.open(tar_path, "w") as tf:
        members = []
        for i, img in enumerate(photos[:7]):
            key = f"00000000{i}" if i != 3 else "img.with.dots"
            ext = "png" if i == 5 else "jpg"
            members.append((f"{key}.{ext}", key, ext, _encode(img, "PNG" if ext == "png" else "JPEG")))
        members.append(("broken.jpg", "broken", "jpg", b"not a jpeg at all"))
        for name, _key, _ext, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with tarfile.open(tar_path) as tf:
        offsets = {m.name: m.offset_data for m in tf.getmembers()}
    ok_row = 0
    for name, key, ext, data in members:
        if key == "broken":
            rows.append(_embed_row("pool", "s000000", tar_path, name, key, ext, data, offsets[name],
                                   status="error", reason="not_an_image"))
        else:
            rows.append(_embed_row("pool", "s000000", tar_path, name, key, ext, data, offsets[name], emb_row=ok_row))
            ok_row += 1
    # Shard s000001: a folder of 2 photos (offset 0, size = file size).
    folder = inputs / "folder"
    folder.mkdir()
    for i, img in enumerate(photos[7:9]):
        data = _encode(img, "JPEG")
        p = folder / f"p{i}.jpg"
        p.write_bytes(data)
        rows.append(_embed_row("pool", "s000001", p, f"p{i}.jpg", f"p{i}", "jpg", data, 0, emb_row=i))
    df = pd.DataFrame(rows)
    for sid, g in df.groupby("shard_id"):
        atomic_write_parquet(out / "embed" / "pool" / f"{sid}.parquet", g.reset_index(drop=True))

    ok_ids = df.loc[df["status"] == "ok", "id"].tolist()
    dup_id = "pool/s000000/000000001"  # duplicate of ...000
    con_id = "pool/s000000/000000002"  # eval copy
    unsel_id = "pool/s000001/p1"  # not retrieved
    dedup = pd.DataFrame({
        "id": ok_ids, "component": np.arange(len(ok_ids), dtype=np.int64), "component_size": 1,
        "kept": [i != dup_id for i in ok_ids],
        "reason": [("near_duplicate" if i == dup_id else None) for i in ok_ids],
        "representative_id": ok_ids, "nn_id": ok_ids[::-1], "nn_sim": 0.5,
    })
    atomic_write_parquet(out / "dedup" / "decisions.parquet", dedup)
    alive = [i for i in ok_ids if i != dup_id]
    decon = pd.DataFrame({
        "id": alive, "contaminated": [i == con_id for i in alive],
        "eval_set": [("digits" if i == con_id else None) for i in alive],
        "eval_id": [("eval-digits/s000000/x" if i == con_id else None) for i in alive],
        "eval_sim": [0.9 if i == con_id else 0.1 for i in alive], "via_component": False,
    })
    atomic_write_parquet(out / "decontaminate" / "decisions.parquet", decon)
    cand = [i for i in alive if i != con_id]
    sel = pd.DataFrame({
        "id": cand, "selected": [i != unsel_id for i in cand], "query_sets": "q",
        "method": "sample", "best_query_id": "query-q/s000000/a", "best_query_sim": 0.7,
        "cluster": np.arange(len(cand)) % 2, "hk_path": None,
    })
    atomic_write_parquet(out / "retrieve" / "selection.parquet", sel)
    fate = {i: ("kept", "write") for i in ok_ids}
    fate["pool/s000000/broken"] = ("dropped", "embed")
    fate[dup_id] = ("dropped", "dedup")
    fate[con_id] = ("dropped", "decontaminate")
    fate[unsel_id] = ("dropped", "retrieve")
    return {"out": out, "fate": fate, "all_ids": set(df["id"])}


def _relist(ids):
    return lambda _inputs: set(ids)


CFG = WriteConfig(images_per_shard=2)


def _final_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "final").iterdir()) if p.name != "audit.txt"}


def test_write_manifest_shards_and_audit(tmp_path):
    fx = build_fixture(tmp_path / "a")
    out = fx["out"]
    summary = write_stage(out, CFG, seed=3)
    manifest = pq.read_table(out / "final" / "manifest.parquet").to_pandas()
    # One row per input item, with the expected fate and reasons.
    assert set(manifest["id"]) == fx["all_ids"] and len(manifest) == len(fx["all_ids"])
    got = {r.id: (r.decision, r.stage) for r in manifest.itertuples()}
    assert got == fx["fate"]
    by_id = manifest.set_index("id")
    assert by_id.loc["pool/s000000/broken", "reason"] == "not_an_image"
    assert by_id.loc["pool/s000000/000000001", "reason"] == "near_duplicate"
    assert by_id.loc["pool/s000000/000000002", "reason"] == "eval_copy"
    assert by_id.loc["pool/s000000/000000002", "eval_set"] == "digits"
    assert by_id.loc["pool/s000001/p1", "reason"] == "not_selected"
    assert summary["funnel"] == {"inputs": 10, "decoded": 9, "after_dedup": 8, "after_decontamination": 7,
                                 "retrieved": 6, "written": 6}
    # Shards: fixed size (2), unique sequential keys, original bytes, metadata json.
    assert [s["count"] for s in summary["shards"]] == [2, 2, 2]
    kept = manifest[manifest["decision"] == "kept"]
    assert sorted(kept["output_key"]) == [f"{i:09d}" for i in range(6)]
    for s in summary["shards"]:
        data = (out / "final" / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        with tarfile.open(out / "final" / s["name"]) as tf:
            for m in tf.getmembers():
                assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (946684800, 0, 0, "", 0o644)
                key, ext = m.name.rsplit(".", 1)
                row = kept[kept["output_key"] == key].iloc[0]
                payload = tf.extractfile(m).read()
                if ext == "json":
                    meta = json.loads(payload)
                    assert meta["id"] == row["id"] and meta["url"].startswith("https://example.com/")
                    assert meta["query_sets"] == "q" and meta["cluster"] in (0, 1)
                    assert isinstance(meta["cluster"], int) and (meta["width"], meta["height"]) == (96, 64)
                else:
                    assert hashlib.sha256(payload).hexdigest() == row["sha256"]
    # The dotted key's original png/jpg bytes made it through.
    assert by_id.loc["pool/s000000/img.with.dots", "decision"] == "kept"
    # Audit passes and writes its report.
    report = audit(out, inputs=["x"], relist=_relist(fx["all_ids"]))
    assert report.ok, report.text()
    assert "PASS" in (out / "final" / "audit.txt").read_text()


def test_write_is_deterministic_and_resumes(tmp_path):
    fx = build_fixture(tmp_path / "a")
    write_stage(fx["out"], CFG, seed=3)
    reference = _final_bytes(fx["out"])

    fx2 = build_fixture(tmp_path / "b")
    out2 = fx2["out"]
    plan_write(out2, CFG, seed=3)
    write_shards(out2, CFG, task_index=1, num_tasks=2, progress=False)  # only some shards…
    # …then a "kill" mid-shard: a torn temp file and a shard without its record.
    (out2 / "final" / ".lvd-000000.tar.abc123.tmp").write_bytes(b"torn")
    rec = out2 / "write" / "shards" / "lvd-000001.json"
    mtime_done = rec.stat().st_mtime_ns
    summary = write_stage(out2, CFG, seed=3)
    assert rec.stat().st_mtime_ns == mtime_done  # complete shard skipped on rerun
    # Same content as the uninterrupted run (paths differ, bytes do not).
    got = _final_bytes(out2)
    assert got.keys() == reference.keys()
    for name in reference:
        if name.endswith(".tar") or name == "summary.json":
            assert got[name] == reference[name], name
    m1 = pq.read_table(fx["out"] / "final" / "manifest.parquet").to_pandas().drop(columns=["input_path"])
    m2 = pq.read_table(out2 / "final" / "manifest.parquet").to_pandas().drop(columns=["input_path"])
    pd.testing.assert_frame_equal(m1, m2)
    assert summary["num_shards"] == 3


def test_changed_source_is_dropped_at_write(tmp_path):
    fx = build_fixture(tmp_path / "a")
    out = fx["out"]
    (tmp_path / "a" / "inputs" / "folder" / "p0.jpg").write_bytes(b"\xff\xd8 changed since embedding")
    write_stage(out, CFG, seed=0)
    manifest = pq.read_table(out / "final" / "manifest.parquet").to_pandas().set_index("id")
    row = manifest.loc["pool/s000001/p0"]
    assert (row["decision"], row["stage"]) == ("dropped", "write")
    assert row["reason"] in ("sha256_mismatch", "source_changed")
    assert pd.isna(row["output_shard"])
    report = audit(out, inputs=["x"], relist=_relist(fx["all_ids"]))
    assert report.ok, report.text()


def test_audit_catches_tampering_and_missing_rows(tmp_path):
    fx = build_fixture(tmp_path / "a")
    out = fx["out"]
    summary = write_stage(out, CFG, seed=1)
    relist = _relist(fx["all_ids"])
    assert audit(out, inputs=["x"], relist=relist).ok

    # 1. An image member's bytes changed inside a shard (same length; tar still valid).
    shard = out / "final" / summary["shards"][0]["name"]
    original = shard.read_bytes()
    with tarfile.open(shard) as tf:
        m = next(m for m in tf.getmembers() if not m.name.endswith(".json"))
    tampered = bytearray(original)
    tampered[m.offset_data + 100] ^= 0xFF
    shard.write_bytes(bytes(tampered))
    report = audit(out, inputs=["x"], relist=relist)
    assert not report.ok
    text = report.text()
    assert "sha256" in text and summary["shards"][0]["name"] in text
    assert "FAIL" in (out / "final" / "audit.txt").read_text()
    shard.write_bytes(original)
    assert audit(out, inputs=["x"], relist=relist).ok

    # 2. A manifest row goes missing.
    mpath = out / "final" / "manifest.parquet"
    manifest = pq.read_table(mpath)
    missing_id = "pool/s000000/broken"
    keep = [i != missing_id for i in manifest.column("id").to_pylist()]
    pq.write_table(manifest.filter(keep), mpath)
    report = audit(out, inputs=["x"], relist=relist)
    assert not report.ok and missing_id in report.text()

    # 3. A kept image's row missing → its shard sample is unaccounted for.
    kept_id = next(i for i, k in zip(manifest.column("id").to_pylist(), manifest.column("decision").to_pylist())
                   if k == "kept")
    keep = [i != kept_id for i in manifest.column("id").to_pylist()]
    pq.write_table(manifest.filter(keep), mpath)
    report = audit(out, inputs=["x"], relist=relist)
    assert not report.ok and "not in the manifest" in report.text()
    pq.write_table(manifest, mpath)
    assert audit(out, inputs=["x"], relist=relist).ok

    # 4. A truncated shard is reported, not a crash.
    shard.write_bytes(original[: len(original) // 3])
    report = audit(out, inputs=["x"], relist=relist)
    assert not report.ok and summary["shards"][0]["name"] in report.text()


def test_written_shards_load_with_webdataset(tmp_path):
    fx = build_fixture(tmp_path / "a")
    out = fx["out"]
    summary = write_stage(out, CFG, seed=0)
    import webdataset as wds

    urls = [str(out / "final" / s["name"]) for s in summary["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(samples) == summary["funnel"]["written"]
    for s in samples:
        img = s.get("jpg", s.get("png"))
        assert img is not None and img.size[0] > 0
        assert s["json"]["key"] == s["__key__"]


def test_plan_refuses_stale_decisions(tmp_path):
    fx = build_fixture(tmp_path / "a")
    out = fx["out"]
    dedup = pq.read_table(out / "dedup" / "decisions.parquet").to_pandas().iloc[1:]
    atomic_write_parquet(out / "dedup" / "decisions.parquet", dedup)
    from curation.write import WriteError

    with pytest.raises(WriteError, match="no dedup decision"):
        build_plan(out, CFG)
    with pytest.raises(WriteError, match="run the embed stage"):
        build_plan(tmp_path / "empty", CFG)
    with pytest.raises(Exception, match="finish"):
        finalize_write(tmp_path / "empty", CFG)


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_jobs_run_tasks_and_report_failures(tmp_path, cluster):
    from curation.jobs import ExecutorConfig, StageFailed, run_tasks

    cfg = ExecutorConfig(cluster=cluster, poll_interval_s=0.1)
    # A stdlib function: submitit pickles it by reference into the worker processes.
    assert run_tasks(cfg, tmp_path / "ok", "ok", json.loads, [("[1]",), ("[2, 3]",)], progress=False) == [[1], [2, 3]]
    with pytest.raises(StageFailed) as info:
        run_tasks(cfg, tmp_path / "bad", "bad", json.loads, [("[1]",), ("{oops",)], ["good one", "bad one"],
                  progress=False)
    msg = str(info.value)
    assert "1 of 2 task(s) failed" in msg and "bad one" in msg and "JSONDecodeError" in msg
    log = Path(msg.split("log: ")[1].split()[0])
    assert log.parent == tmp_path / "bad" and log.is_file()


def test_local_array_runs_at_most_array_parallelism_tasks_at_once(tmp_path):
    """The local executor starts every task it is handed; run_tasks hands it array_parallelism at a time."""
    import subprocess

    from curation.jobs import ExecutorConfig, run_tasks

    cfg = ExecutorConfig(cluster="local", poll_interval_s=0.1, array_parallelism=2)
    script = "date +%s.%N; sleep 1; date +%s.%N"
    out = run_tasks(cfg, tmp_path, "waves", subprocess.check_output, [(["sh", "-c", script],)] * 5, progress=False)
    spans = [tuple(float(t) for t in o.split()) for o in out]
    assert len(spans) == 5
    for start, _ in spans:  # tasks running when each one started, itself included
        assert sum(a <= start < b for a, b in spans) <= 2
