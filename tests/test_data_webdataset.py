"""Shard reading and sample streams: keys, damage, rank split, determinism, skip, mixing."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov2.data.shards import expand_braces, split_key, write_shard
from dinov2.data.webdataset import (
    DataError,
    SampleStream,
    SourceSlotStream,
    iter_tar_samples,
    scan_shard,
    stream_batches_before,
)


def _photo_bytes(sign_digits: Path, n: int) -> list[bytes]:
    files = sorted(sign_digits.glob("*/*.JPG"))[:n]
    assert len(files) == n
    return [f.read_bytes() for f in files]


def _make_shards(tmp_path: Path, photos: list[bytes], n_shards: int, per_shard: int, prefix: str = "src") -> str:
    it = iter(range(n_shards * per_shard))
    for s in range(n_shards):
        members = []
        for _ in range(per_shard):
            i = next(it)
            # Dotted keys on purpose: webdataset would cut them at the first dot.
            members.append((f"{prefix}/img.{s:02d}.{i:05d}.jpg", photos[i % len(photos)]))
            members.append((f"{prefix}/img.{s:02d}.{i:05d}.json", b'{"i": %d}' % i))
        write_shard(str(tmp_path / f"{prefix}-{s:06d}.tar"), members)
    return str(tmp_path / f"{prefix}-{{000000..{n_shards - 1:06d}}}.tar")


def test_expand_braces():
    assert expand_braces("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_braces("x{1..3}") == ["x1", "x2", "x3"]
    assert expand_braces("{a,b}/{08..10}.tar") == ["a/08.tar", "a/09.tar", "a/10.tar", "b/08.tar", "b/09.tar", "b/10.tar"]
    assert expand_braces("p{1..2}::q") == ["p1", "p2", "q"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    assert len(expand_braces("lvd-{000000..000127}.tar")) == 128
    with pytest.raises(ValueError, match="unbalanced"):
        expand_braces("a{1..3")
    with pytest.raises(ValueError, match="descending"):
        expand_braces("a{3..1}")


def test_split_key_keeps_dots():
    assert split_key("dir/img.0001.jpg") == ("dir/img.0001", "jpg")
    assert split_key("a.b/c.d.e.png") == ("a.b/c.d.e", "png")
    assert split_key("dir/noext") == ("dir/noext", "")
    assert split_key("dir.x/noext") == ("dir.x/noext", "")


def test_scan_groups_dotted_keys_and_reads_bytes(tmp_path, sign_digits):
    photos = _photo_bytes(sign_digits, 3)
    members = []
    for i, p in enumerate(photos):
        members += [(f"s/img.{i}.v2.json", b"{}"), (f"s/img.{i}.v2.JPG", p), (f"s/img.{i}.v2.txt", b"cap")]
    members.append(("s/caption_only.txt", b"no image here"))
    write_shard(str(tmp_path / "a.tar"), members)
    scan = scan_shard(str(tmp_path / "a.tar"))
    assert [r.key for r in scan.refs] == ["s/img.0.v2", "s/img.1.v2", "s/img.2.v2"]
    assert scan.problems == Counter({"no_image": 1})
    got = list(iter_tar_samples(str(tmp_path / "a.tar")))
    assert [g[2] for g in got] == photos  # exact image bytes via header offsets


def test_truncated_and_corrupt_tars(tmp_path, sign_digits):
    photos = _photo_bytes(sign_digits, 4)
    write_shard(str(tmp_path / "full.tar"), [(f"k.{i}.jpg", p) for i, p in enumerate(photos)])
    data = (tmp_path / "full.tar").read_bytes()
    sizes = [len(p) for p in photos]
    # Cut in the middle of the third image: the first two samples survive, the damage is counted.
    cut = 512 * 3 + sum(-(-s // 512) * 512 for s in sizes[:2]) + 100
    (tmp_path / "cut.tar").write_bytes(data[:cut])
    scan = scan_shard(str(tmp_path / "cut.tar"))
    assert [r.key for r in scan.refs] == ["k.0", "k.1"]
    assert scan.problems["truncated_tar"] == 1
    # Cut inside a header.
    (tmp_path / "cuthdr.tar").write_bytes(data[: 512 + -(-sizes[0] // 512) * 512 + 200])
    scan = scan_shard(str(tmp_path / "cuthdr.tar"))
    assert [r.key for r in scan.refs] == ["k.0"] and scan.problems["truncated_tar"] == 1
    # Garbage in the second header: read up to it, count a tar error.
    bad = bytearray(data)
    second = 512 + -(-sizes[0] // 512) * 512
    bad[second : second + 100] = b"\x07" * 100
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    scan = scan_shard(str(tmp_path / "bad.tar"))
    assert [r.key for r in scan.refs] == ["k.0"] and scan.problems["tar_error"] == 1
    # Not a tar at all / missing / empty.
    (tmp_path / "junk.tar").write_bytes(b"hello" * 300)
    assert scan_shard(str(tmp_path / "junk.tar")).problems["tar_error"] == 1
    assert scan_shard(str(tmp_path / "missing.tar")).problems["shard_unreadable"] == 1
    (tmp_path / "empty.tar").write_bytes(b"")
    assert scan_shard(str(tmp_path / "empty.tar")).refs == []


@pytest.mark.parametrize("n_shards,num_slots", [(6, 4), (3, 8), (5, 5)])
def test_slots_are_disjoint_and_cover_each_epoch(tmp_path, sign_digits, n_shards, num_slots):
    photos = _photo_bytes(sign_digits, 10)
    pattern = _make_shards(tmp_path, photos, n_shards, 7)
    shards = expand_braces(pattern)
    all_keys = {r.key for s in shards for r in scan_shard(s).refs}
    for epoch in (0, 1):
        seen = []
        for slot in range(num_slots):
            st = SourceSlotStream(shards, 0, seed=3, slot=slot, num_slots=num_slots, counters=Counter())
            keys = [r.key for r in st.epoch_refs(epoch)]
            assert keys, "every slot gets data even with fewer shards than slots"
            seen += keys
        assert len(seen) == len(set(seen)) == len(all_keys)
        assert set(seen) == all_keys
    # Epochs use different shard orders.
    st = SourceSlotStream(shards, 0, seed=3, slot=0, num_slots=num_slots, counters=Counter())
    assert any(st.epoch_assignment(e) != st.epoch_assignment(0) for e in range(1, 6))


def test_stream_determinism_and_skip(tmp_path, sign_digits):
    photos = _photo_bytes(sign_digits, 10)
    pattern = _make_shards(tmp_path, photos, 4, 9)
    shards = expand_braces(pattern)

    def make(seed=0):
        return SampleStream([shards], [1.0], seed=seed, slot=1, num_slots=3, shuffle_buffer=5)

    a = [make().next_ref() for _ in range(1)]
    s1, s2 = make(), make()
    seq1 = [s1.next_ref() for _ in range(80)]  # several epochs of this slot
    seq2 = [s2.next_ref() for _ in range(80)]
    assert seq1 == seq2 and a[0] == seq1[0]
    s_other = make(seed=1)
    assert [r.key for r in seq1] != [s_other.next_ref().key for _ in range(80)]
    s3 = make()
    s3.skip(37)
    assert [s3.next_ref() for _ in range(43)] == seq1[37:]
    # The shuffle buffer really shuffles: the order is not the shard order.
    keys = [r.key for r in seq1[:12]]
    assert keys != sorted(keys)


def test_mixing_ratios(tmp_path, sign_digits):
    photos = _photo_bytes(sign_digits, 10)
    pa = _make_shards(tmp_path, photos, 2, 10, prefix="a")
    pb = _make_shards(tmp_path, photos, 2, 10, prefix="b")
    st = SampleStream([expand_braces(pa), expand_braces(pb)], [3.0, 1.0], seed=0, slot=0, num_slots=1,
                      shuffle_buffer=4)
    counts = Counter(st.next_ref().source for _ in range(2000))
    assert abs(counts[0] / 2000 - 0.75) < 0.04, counts


def test_source_without_samples_is_a_clear_error(tmp_path):
    (tmp_path / "junk-0.tar").write_bytes(b"not a tar" * 200)
    st = SampleStream([[str(tmp_path / "junk-0.tar")]], [1.0], seed=0, slot=0, num_slots=1, shuffle_buffer=2)
    with pytest.raises(DataError, match="no readable samples"):
        st.next_ref()
    assert st.counters["tar_error"] >= 1


def test_stream_batches_before():
    K = 4
    for first in range(13):
        for k in range(K):
            assert stream_batches_before(first, k, K) == sum(1 for j in range(first) if j % K == k)


def test_bytes_are_real_jpegs(tmp_path, sign_digits):
    photos = _photo_bytes(sign_digits, 2)
    write_shard(str(tmp_path / "x.tar"), [("a.b.jpg", photos[0]), ("c.d.jpg", photos[1])])
    for _, _, data in iter_tar_samples(str(tmp_path / "x.tar")):
        img = Image.open(io.BytesIO(data))
        assert img.size == (100, 100)
        assert np.asarray(img.convert("RGB")).std() > 5


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_fast_header_reader_matches_tarfile(tmp_path, sign_digits, fmt):
    import tarfile

    photos = _photo_bytes(sign_digits, 4)
    long_dir = "d" * 120 if fmt != "ustar" else "d" * 90  # ustar: prefix/name split; gnu/pax: long names
    names = [f"{long_dir}/sub/img.{i}.b.jpg" for i in range(3)] + ["caf\u00e9.0.png" if fmt == "pax" else "plain.0.png"]
    path = tmp_path / f"{fmt}.tar"
    format_ = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[fmt]
    with tarfile.open(path, "w", format=format_) as tf:
        d = tarfile.TarInfo("a_dir")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for name, data in zip(names, photos):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            meta = tarfile.TarInfo(name.rsplit(".", 1)[0] + ".json")
            meta.size = 2
            tf.addfile(meta, io.BytesIO(b"{}"))
        link = tarfile.TarInfo("link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "target.jpg"
        tf.addfile(link)
    fast, slow = scan_shard(str(path)), scan_shard(str(path), use_tarfile=True)
    assert [r.key for r in fast.refs] == [n.rsplit(".", 1)[0] for n in names]
    assert fast.refs == slow.refs and fast.problems == slow.problems
    data = path.read_bytes()
    for cut in range(0, len(data), 1777):  # damage anywhere: same samples survive either way
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        f, s = scan_shard(str(tmp_path / "cut.tar")), scan_shard(str(tmp_path / "cut.tar"), use_tarfile=True)
        assert f.refs == s.refs, cut
        assert bool(f.problems) == bool(s.problems), cut


def test_random_corruption_never_raises(tmp_path, sign_digits):
    photos = _photo_bytes(sign_digits, 3)
    write_shard(str(tmp_path / "ok.tar"), [(f"k.{i}.jpg", p) for i, p in enumerate(photos)])
    data = (tmp_path / "ok.tar").read_bytes()
    rng = np.random.default_rng(0)
    for trial in range(150):
        bad = bytearray(data)
        for pos in rng.integers(0, 3 * 512, size=int(rng.integers(1, 6))):  # hit the headers
            bad[int(pos)] = int(rng.integers(0, 256))
        (tmp_path / "bad.tar").write_bytes(bytes(bad[: int(rng.integers(0, len(bad) + 1))]))
        scan = scan_shard(str(tmp_path / "bad.tar"))
        assert len(scan.refs) <= 3, trial
