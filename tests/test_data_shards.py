"""The shard format module (dinov2/data/shards.py): listing, byte ranges, writing, member names."""
from __future__ import annotations

import io
import tarfile

import pytest

from conftest import encode, skimage_photo
from dinov2.data.shards import (
    IMAGE_EXTENSIONS,
    RangeReader,
    ShardWriter,
    ShortRead,
    group_samples,
    list_tar,
    read_range,
    write_shard,
    written_image_ext,
)


def test_writer_is_deterministic_and_atomic(tmp_path):
    jpg = encode(skimage_photo("coffee", (40, 30)))
    members = [("a.b.jpg", jpg), ("a.b.json", b"{}")]
    write_shard(tmp_path / "one.tar", members)
    write_shard(tmp_path / "two.tar", members)
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "broken.tar") as w:
        w.add("x.jpg", jpg)
        raise RuntimeError("killed mid-shard")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.tar", "two.tar"]  # no torn or temp file
    listing = list_tar(tmp_path / "one.tar")
    assert listing.damage is None and [m.name for m in listing.members] == ["a.b.jpg", "a.b.json"]
    (sample,) = group_samples(listing.members)
    ext, member = sample.image()
    assert (sample.key, ext) == ("a.b", "jpg") and read_range(tmp_path / "one.tar", member.offset, member.size) == jpg


def test_written_member_is_named_after_the_real_format():
    img = skimage_photo("rocket", (32, 32))
    assert written_image_ext("jpg", encode(img, "GIF")) == "gif"  # a GIF saved as .jpg
    assert written_image_ext("jfif", encode(img)) == "jpg"
    assert written_image_ext("tiff", encode(img, "TIFF")) == "tif"
    assert written_image_ext("PNG", b"not an image") == "png"  # undecodable: keeps an accepted name
    assert written_image_ext("exe", b"not an image") == "jpg"
    assert {written_image_ext(None, encode(img, f)) for f in ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")} <= set(
        IMAGE_EXTENSIONS)


def test_listing_reports_non_files_and_damage(tmp_path):
    buf = io.BytesIO()
    payload = b"\xff" * 1000
    with tarfile.open(fileobj=buf, mode="w") as tf:
        d = tarfile.TarInfo("folder")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
        tf.addfile(link)
        for name in ("a.jpg", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    (tmp_path / "t.tar").write_bytes(data[: 3 * 512 + 1024 + 512 + 100])  # cut inside b.jpg's data
    listing = list_tar(tmp_path / "t.tar")
    assert [(m.name, m.kind) for m in listing.members] == [
        ("folder", "directory"), ("link.jpg", "symbolic link"), ("a.jpg", "file")]
    assert listing.damage.reason == "truncated_tar" and listing.damage.offset == 3 * 512 + 1024
    assert [s.key for s in group_samples(listing.members)] == ["a"]  # links and folders are no samples
    slow = list_tar(tmp_path / "t.tar", use_tarfile=True)
    assert slow.members == listing.members and slow.damage.reason == "truncated_tar"
    (tmp_path / "z.tar.gz").write_bytes(b"\x1f\x8b" + bytes(600))
    assert "gzip" in list_tar(tmp_path / "z.tar.gz").damage.detail


def test_range_reads_refuse_short_files(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(bytes(range(200)))
    assert read_range(f) == bytes(range(200)) and read_range(f, 10, 5) == bytes(range(10, 15))
    with RangeReader(max_open=1) as r:
        assert r.read(str(f), 190, 10) == bytes(range(190, 200))
        f.write_bytes(bytes(100))  # the file shrank after it was listed
        with pytest.raises(ShortRead):
            r.read(str(f), 190, 10)
