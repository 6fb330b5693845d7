"""One shard format end to end: every image type ingest accepts → curated shard → trainer and eval.

Also the inputs that used to break a stage: a GIF in the crawl (written, audited and trained on like
any other image) and names / sidecar text that are not valid UTF-8 (stored escaped, bytes still
copied from the right file).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import encode, skimage_photo, write_tar
from curation import layout
from curation.audit import audit
from curation.dedup import DedupConfig, run_dedup
from curation.embed import embed_stage
from curation.embedders import EmbedderConfig, load_embedder
from curation.write import WriteConfig, finalize_write, plan_write, write_shards
from dinov2.data.shards import IMAGE_EXTENSIONS
from dinov2.data.webdataset import scan_shard

# One real photo per accepted extension, encoded in that format (distinct photos: none is a copy).
FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "jfif": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP",
           "gif": "GIF", "tif": "TIFF", "tiff": "TIFF"}
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "hubble_deep_field", "retina")


@pytest.fixture(scope="module")
def embedder():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_embedder(EmbedderConfig(kind="efficientnet_lite0", image_size=64, batch_size=16, device="cpu"))
    torch.set_num_threads(before)  # the per-test restore saw 1 already: module fixtures are set up first


def _curate(out: Path, inputs: list[str], embedder) -> dict:
    """embed → dedup → write (no eval / query sets) → audit; returns the summary."""
    embed_stage("pool", inputs, {"eff": embedder}, out, progress=False, num_workers=1)
    # Distinct photos stay apart at any sane threshold; 0.99 keeps this test about formats.
    run_dedup(out, DedupConfig(threshold=0.99))
    cfg = WriteConfig(images_per_shard=100)
    plan_write(out, cfg, decontaminate_required=False, retrieve_required=False)
    write_shards(out, cfg, progress=False)
    summary = finalize_write(out, cfg)
    report = audit(out, inputs=inputs)
    assert report.ok, report.text()
    return summary


def test_every_accepted_image_type_reaches_the_trainer_and_eval(tmp_path, embedder):
    assert set(FORMATS) == set(IMAGE_EXTENSIONS)
    members, sha_by_key = [], {}
    for i, (ext, fmt) in enumerate(FORMATS.items()):
        data = encode(skimage_photo(PHOTOS[i], (96, 80)), fmt)
        key = f"img.{i:02d}.{ext}-photo"  # dotted keys stay whole
        members += [(f"{key}.{ext}", data), (f"{key}.json", json.dumps({"caption": ext}).encode())]
        sha_by_key[key] = ext
    write_tar(tmp_path / "crawl-000.tar", members)
    out = tmp_path / "out"
    summary = _curate(out, [str(tmp_path / "crawl-000.tar")], embedder)
    assert summary["funnel"]["written"] == len(FORMATS)

    (shard,) = [layout.final_shard(out, s["name"]) for s in summary["shards"]]
    refs = scan_shard(str(shard)).refs
    manifest = pq.read_table(layout.manifest(out)).to_pandas().set_index("output_key")
    written_ext = {manifest.loc[r.key, "key"]: r.ext for r in refs}
    # Members are named after their real format (a .jfif JPEG is written as .jpg, .tiff as .tif).
    want = {k: {"JPEG": "jpg", "TIFF": "tif"}.get(FORMATS[e], e) for k, e in sha_by_key.items()}
    assert written_ext == want

    # The trainer's loader decodes every one of them (no shuffle: batch 0 is the whole epoch).
    from dinov2.data.augment import CropsConfig
    from dinov2.data.loader import DataConfig, SourceConfig, build_train_loader

    n = len(FORMATS)
    cfg = DataConfig(sources=[SourceConfig(pattern=str(shard))], batch_size=n, num_workers=0, streams_per_rank=1,
                     shuffle_buffer=1, crops=CropsConfig(global_crops_size=28, local_crops_number=0), patch_size=14)
    loader = build_train_loader(cfg)
    batch = next(iter(loader))
    assert tuple(batch["collated_global_crops"].shape) == (2 * n, 3, 28, 28)
    assert sum(loader.bad_sample_counts().values()) == 0

    # And the eval feature extractor reads the same members.
    from dinov2.eval.features import EvalTransformConfig, Item, extract_features
    from dinov2.models.vit import vit_tiny

    items = [Item(str(shard), 0, r.offset, r.size) for r in refs]
    feats = extract_features(vit_tiny(img_size=28).eval(), items, EvalTransformConfig(resize_size=32, crop_size=28),
                             batch_size=n)
    assert feats.features.shape[0] == n and not feats.bad


def test_non_utf8_names_and_lone_surrogates_are_stored_escaped(tmp_path, embedder):
    tar = tmp_path / "crawl-000.tar"
    bad_name = os.fsdecode(b"caf\xe9")  # a Latin-1 name: not UTF-8
    write_tar(tar, [
        (f"{bad_name}.jpg", encode(skimage_photo("coffee", (90, 70)))),
        (f"{bad_name}.json", b'{"caption": "lone \\ud800 surrogate", "url": "https://e.com/\\udcff"}'),
        ("plain.png", encode(skimage_photo("rocket", (70, 90)), "PNG")),
    ])
    folder = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"ph\xf6tos")))  # a non-UTF-8 folder
    folder.mkdir()
    (folder / os.fsdecode(b"\xff\xfe.jpg")).write_bytes(encode(skimage_photo("chelsea", (80, 80))))
    out = tmp_path / "out"
    inputs = [str(tar), str(folder)]
    summary = _curate(out, inputs, embedder)
    assert summary["funnel"] == dict(summary["funnel"], inputs=3, decoded=3, written=3)

    rows = {r["member"]: r for r in pq.read_table(layout.embed_parquet(out, "pool", "s000000")).to_pylist()}
    row = rows["caf\\xe9.jpg"]
    assert row["status"] == "ok" and row["key"] == "caf\\xe9" and row["id"] == "pool/s000000/caf\\xe9"
    assert row["caption"] == "lone \\ud800 surrogate" and row["url"] == "https://e.com/\\xff"
    assert row["input_path"] == str(tar) and row["input_path_bytes"] is None
    (frow,) = pq.read_table(layout.embed_parquet(out, "pool", "s000001")).to_pylist()
    assert frow["status"] == "ok" and frow["key"] == "\\xff\\xfe"
    assert frow["input_path"].endswith("ph\\xf6tos/\\xff\\xfe.jpg")
    assert os.fsdecode(frow["input_path_bytes"]) == str(folder / os.fsdecode(b"\xff\xfe.jpg"))

    # The writer copied the original bytes of all three (the audit re-hashed them above).
    manifest = pq.read_table(layout.manifest(out)).to_pandas()
    assert Counter(manifest["decision"]) == {"kept": 3}
