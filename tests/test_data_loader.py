"""End to end: tar shards of real photos → collated multi-crop batches; resume; bad data; workers."""
from __future__ import annotations

import io
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.augment import CropsConfig
from dinov2.data.loader import DataConfig, SourceConfig, build_train_loader
from dinov2.data.shards import write_shard
from dinov2.data.webdataset import DataError
from dinov2.utils.config import ConfigError, load_config


def _bad_members() -> list[tuple[str, bytes]]:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8) + 90).save(buf, "JPEG")
    good = buf.getvalue()
    la = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 2), dtype=np.uint8), "LA").save(la, "PNG")
    i16 = io.BytesIO()
    Image.fromarray((np.arange(40 * 40).reshape(40, 40) * 40).astype(np.uint16)).save(i16, "PNG")
    return [
        ("bad/zero.0.jpg", b""),
        ("bad/trunc.1.jpg", good[: len(good) // 2]),
        ("bad/text.2.jpg", b"this is not an image at all" * 10),
        ("bad/odd.la.png", la.getvalue()),  # odd modes decode fine
        ("bad/odd.i16.png", i16.getvalue()),
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, sign_digits) -> dict[str, str]:
    root = tmp_path_factory.mktemp("shards")
    photos = [f.read_bytes() for f in sorted(sign_digits.glob("*/*.JPG"))[::23][:60]]
    i = 0
    for s in range(4):  # source "a": 4 shards x 10, with dotted keys
        members = []
        for _ in range(10):
            members += [(f"a/{s}/img.{i:04d}.jpg", photos[i % len(photos)]), (f"a/{s}/img.{i:04d}.txt", b"hand")]
            i += 1
        if s == 1:
            members[2:2] = _bad_members()
        write_shard(str(root / f"a-{s:03d}.tar"), members)
    for s in range(2):  # source "b": 2 shards x 10, the second one truncated after ~6 samples
        members = [(f"b/{s}/p.{k}.jpg", photos[(i + k) % len(photos)]) for k in range(10)]
        write_shard(str(root / f"b-{s:03d}.tar"), members)
    data = (root / "b-001.tar").read_bytes()
    (root / "b-001.tar").write_bytes(data[: len(data) // 2])
    return {"a": str(root / "a-{000..003}.tar"), "b": str(root / "b-{000..001}.tar")}


def _cfg(shards, **kw) -> DataConfig:
    base = {
        "sources": [SourceConfig(pattern=shards["a"], weight=2.0), SourceConfig(pattern=shards["b"], weight=1.0)],
        "batch_size": 4, "num_workers": 0, "streams_per_rank": 2, "shuffle_buffer": 6, "seed": 11, "patch_size": 7,
        "crops": CropsConfig(global_crops_size=28, local_crops_size=14, local_crops_number=2),
    }
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    return list(islice(iter(loader), n))


def _same(b1, b2) -> bool:
    return (b1["keys"] == b2["keys"] and b1["sample_index"] == b2["sample_index"]
            and torch.equal(b1["collated_global_crops"], b2["collated_global_crops"])
            and torch.equal(b1["collated_local_crops"], b2["collated_local_crops"])
            and torch.equal(b1["collated_masks"], b2["collated_masks"]))


def test_batches_shapes_and_determinism(shards):
    cfg = _cfg(shards)
    a = _take(build_train_loader(cfg), 5)
    b = _take(build_train_loader(cfg), 5)
    assert all(_same(x, y) for x, y in zip(a, b))
    batch = a[0]
    assert batch["collated_global_crops"].shape == (8, 3, 28, 28)
    assert batch["collated_local_crops"].shape == (8, 3, 14, 14)
    assert batch["collated_masks"].shape == (8, 16)
    assert [x["sample_index"] for x in a] == [0, 4, 8, 12, 16]
    assert [x["next_sample"] for x in a] == [4, 8, 12, 16, 20]
    # Iterating again continues after the last batch handed out.
    loader = build_train_loader(cfg)
    first, second = _take(loader, 2), _take(loader, 3)
    assert all(_same(x, y) for x, y in zip(first + second, a))
    assert loader.state_dict() == {"next_sample": 20}
    other = _take(build_train_loader(_cfg(shards, seed=12)), 5)
    assert [x["keys"] for x in other] != [x["keys"] for x in a]


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_gives_the_same_remaining_sequence(shards, world_size):
    cfg = _cfg(shards)
    for rank in range(world_size):
        full = _take(build_train_loader(cfg, rank, world_size), 9)
        for cut in (3, 4):  # resume inside and at the start of a stream cycle
            resumed = _take(build_train_loader(cfg, rank, world_size, start_sample=full[cut - 1]["next_sample"]), 9 - cut)
            assert all(_same(x, y) for x, y in zip(full[cut:], resumed)), (rank, cut)
    if world_size == 2:
        k0 = {k for b in _take(build_train_loader(cfg, 0, 2), 3) for k in b["keys"]}
        k1 = {k for b in _take(build_train_loader(cfg, 1, 2), 3) for k in b["keys"]}
        assert k0 != k1


def test_worker_count_does_not_change_the_stream(shards):
    one = _take(build_train_loader(_cfg(shards, num_workers=0)), 6)
    two = _take(build_train_loader(_cfg(shards, num_workers=2)), 6)
    assert all(_same(x, y) for x, y in zip(one, two))
    resumed = _take(build_train_loader(_cfg(shards, num_workers=2), start_sample=one[2]["next_sample"]), 3)
    assert all(_same(x, y) for x, y in zip(one[3:], resumed))


def test_bad_images_and_truncated_tar_are_counted(shards):
    cfg = _cfg(shards, shuffle_buffer=2)
    loader = build_train_loader(cfg)
    n = 0
    for batch in islice(iter(loader), 40):  # > one epoch of every stream
        assert batch["collated_global_crops"].shape[0] == 8  # batches never shrink
        assert torch.isfinite(batch["collated_global_crops"]).all()
        n += 1
    counts = loader.bad_sample_counts()
    assert n == 40
    assert counts.get("empty", 0) >= 1
    assert counts.get("truncated", 0) >= 1
    assert counts.get("not_an_image", 0) >= 1
    assert counts.get("truncated_tar", 0) >= 1
    assert "no_image" not in counts  # the .txt members sit next to their images
    # Mixing: roughly 2:1 between the sources.
    sources = torch.cat([b["sources"] for b in _take(build_train_loader(_cfg(shards)), 30)])
    assert 0.55 < float((sources == 0).float().mean()) < 0.8


def test_config_errors(shards, tmp_path):
    with pytest.raises(ConfigError, match="divide"):
        build_train_loader(_cfg(shards, num_workers=3))
    with pytest.raises(ConfigError, match="none of its"):
        build_train_loader(_cfg(shards, sources=[SourceConfig(pattern=str(tmp_path / "x-{0..3}.tar"))]))
    with pytest.raises(ConfigError, match="sources is empty"):
        build_train_loader(_cfg(shards, sources=[]))
    with pytest.raises(ValueError, match="multiple of"):
        build_train_loader(_cfg(shards), start_sample=3)
    yaml = tmp_path / "data.yaml"
    yaml.write_text(f"sources:\n  - pattern: '{shards['a']}'\n    weight: 3\nbatch_size: 2\ncrops:\n  local_crops_number: 4\n")
    cfg = load_config(DataConfig, yaml, ["seed=5"])
    assert cfg.sources[0].weight == 3.0 and cfg.batch_size == 2 and cfg.crops.local_crops_number == 4
    assert cfg.seed == 5 and cfg.crops.blur_p_global1 == 1.0
    with pytest.raises(ConfigError):
        load_config(DataConfig, yaml, ["crops.nonexistent=1"])


def test_missing_shard_is_counted_not_fatal(shards, tmp_path):
    pattern = shards["a"].replace("{000..003}", "{000..004}")  # a-004.tar does not exist
    loader = build_train_loader(_cfg(shards, sources=[SourceConfig(pattern=pattern)], shuffle_buffer=2))
    assert len(_take(loader, 25)) == 25
    assert loader.bad_sample_counts().get("shard_unreadable", 0) >= 1


def test_real_photo_crops_are_sensible(shards):
    batch = _take(build_train_loader(_cfg(shards)), 1)[0]
    g = batch["collated_global_crops"]
    assert g.std() > 0.2  # real content, normalised
    assert not torch.equal(g[0], g[4])  # the two global views of a sample differ
    assert batch["masks_weight"].numel() == int(batch["n_masked_patches"])


def test_all_bad_source_fails_clearly_instead_of_hanging(tmp_path):
    write_shard(str(tmp_path / "bad-0.tar"), [(n, d) for n, d in _bad_members() if "odd" not in n] * 3)
    cfg = DataConfig(sources=[SourceConfig(pattern=str(tmp_path / "bad-0.tar"))], batch_size=2, num_workers=0,
                     streams_per_rank=1, shuffle_buffer=2, patch_size=7, max_consecutive_empty_batches=5,
                     crops=CropsConfig(global_crops_size=28, local_crops_size=14, local_crops_number=1))
    loader = build_train_loader(cfg)
    with pytest.raises(DataError, match="consecutive batches"):
        next(iter(loader))
    assert loader.next_sample == 10  # positions still advanced past the empty batches
    counts = loader.bad_sample_counts()
    assert counts["empty_batch"] == 5 and counts["empty"] >= 1


def test_reference_sizes_end_to_end(shards):
    cfg = DataConfig(sources=[SourceConfig(pattern=shards["a"])], batch_size=2, num_workers=0,
                     streams_per_rank=1, shuffle_buffer=4)  # defaults: 2 x 224, 8 x 98, /14 patches
    batch = _take(build_train_loader(cfg), 1)[0]
    assert batch["collated_global_crops"].shape == (4, 3, 224, 224)
    assert batch["collated_local_crops"].shape == (16, 3, 98, 98)
    masks = batch["collated_masks"]
    assert masks.shape == (4, 256)
    assert int((masks.sum(-1) > 0).sum()) == 2  # half of the 2B global crops are masked
    assert batch["upperbound"] >= int(batch["n_masked_patches"])
