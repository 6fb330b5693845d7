"""Input listing and safe item iteration (curation/ingest.py) and the perceptual hash."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import jpeg_bytes, skimage_photo, write_tar
from PIL import Image

from curation.ingest import InputReader, read_bytes
from curation.inputs import InputError, expand_braces, expand_inputs
from curation.phash import hamming, phash, phash_bits
from dinov2.data.shards import split_key


# ----------------------------------------------------------------------------- expand_inputs
def test_brace_expansion_keeps_padding_and_nests():
    assert expand_braces("lvd-{000000..000002}.tar") == ["lvd-000000.tar", "lvd-000001.tar", "lvd-000002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    assert expand_braces("x{y}z") == ["x{y}z"]
    assert expand_braces("{p,{q,r}}") == ["p", "q", "r"]


def test_expand_inputs_ranges_globs_folders_lists(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"lvd-{i:06d}.tar", [("0.jpg", b"x")])
    (tmp_path / "photos").mkdir()
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "list.parquet")
    got = expand_inputs([str(tmp_path / "lvd-{000000..000001}.tar"), str(tmp_path / "*.tar"),
                         str(tmp_path / "photos"), str(tmp_path / "list.parquet")])
    names = [os.path.basename(p) for p in got]
    assert names == ["list.parquet", "lvd-000000.tar", "lvd-000001.tar", "lvd-000002.tar", "photos"]
    assert all(os.path.isabs(p) for p in got)  # sorted, de-duplicated, absolute


def test_expand_inputs_errors_are_clear(tmp_path):
    write_tar(tmp_path / "lvd-000000.tar", [("0.jpg", b"x")])
    with pytest.raises(InputError, match=r"1 input\(s\) missing: .*lvd-000001.tar"):
        expand_inputs([str(tmp_path / "lvd-{000000..000001}.tar")])
    with pytest.raises(InputError, match="matched nothing"):
        expand_inputs([str(tmp_path / "*.webdataset")])
    (tmp_path / "x.tar.gz").write_bytes(b"")
    with pytest.raises(InputError, match="compressed tar not supported"):
        expand_inputs([str(tmp_path / "x.tar.gz")])
    (tmp_path / "readme.md").write_text("hi")
    with pytest.raises(InputError, match="unsupported input"):
        expand_inputs([str(tmp_path / "readme.md")])
    pq.write_table(pa.table({"file": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="no 'path' column"):
        expand_inputs([str(tmp_path / "bad.parquet")])


def test_split_key_only_final_extension():
    assert split_key("a.b.c.jpg") == ("a.b.c", "jpg")
    assert split_key("dir.v2/000000001.webp") == ("dir.v2/000000001", "webp")
    assert split_key("dir.v2/README") == ("dir.v2/README", "")


# ----------------------------------------------------------------------------- items
def test_tar_items_group_sidecars_and_offsets(tmp_path):
    jpg = jpeg_bytes(skimage_photo("coffee", (90, 60)))
    meta = {"url": "https://e.com/1.jpg", "caption": "a cup", "width": 90, "height": 60}
    path = tmp_path / "00000.tar"
    # json before the image and txt after it: grouping must not depend on member order
    write_tar(path, [("x.y.json", json.dumps(meta).encode()), ("x.y.jpg", jpg), ("x.y.txt", b"ignored caption"),
                ("solo.txt", b"orphan sidecar is silently ignored"), ("x.y.npy", b"extra sidecar")])
    with InputReader(path) as r:
        items = r.items()
        assert [(i.key, i.ext, i.reason) for i in items] == [("x.y", "jpg", None)]
        item = items[0]
        assert (item.url, item.caption) == (meta["url"], meta["caption"])
        assert r.read(item) == jpg
    assert item.input_path == str(path)
    assert read_bytes(item.input_path, item.byte_offset, item.byte_size) == jpg


def test_tar_cut_at_member_boundary_and_in_header(tmp_path):
    jpg = jpeg_bytes(skimage_photo("rocket", (40, 60)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("a.jpg", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tf.addfile(info, io.BytesIO(jpg))
        end = tf.offset  # end of b.jpg's data, before the end-of-archive blocks
    data = buf.getvalue()
    (tmp_path / "boundary.tar").write_bytes(data[:end])
    (tmp_path / "inheader.tar").write_bytes(data[:end] + b"\x01" * 100)
    for name in ("boundary.tar", "inheader.tar"):
        with InputReader(tmp_path / name) as r:
            items = r.items()
        assert [i.reason for i in items] == [None, None, "truncated_tar"], name
        assert items[-1].id_key == "__truncated_tar__"


def test_folder_items_recursive_sorted_with_sidecars(tmp_path):
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    (root / "a").mkdir()
    (root / ".cache").mkdir()
    jpg = jpeg_bytes(skimage_photo("chelsea", (60, 40)))
    (root / "b" / "2.jpg").write_bytes(jpg)
    (root / "a" / "1.jpg").write_bytes(jpg)
    (root / "a" / "1.txt").write_text("a cat")
    (root / "top.png").write_bytes(jpg)  # wrong extension: still an image candidate
    (root / "notes.csv").write_text("x,y")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / ".cache" / "3.jpg").write_bytes(jpg)
    os.symlink(root / "a" / "1.jpg", root / "b" / "link.jpg")
    with InputReader(root) as r:
        items = r.items()
        rows = [(i.member, i.reason) for i in items]
        assert rows == [("a/1.jpg", None), ("b/2.jpg", None), ("b/link.jpg", None), ("notes.csv", "not_an_image"),
                        ("top.png", None)]
        assert items[0].caption == "a cat"
        assert items[0].input_path == str(root / "a" / "1.jpg") and items[0].byte_offset == 0
        assert r.read(items[1]) == jpg


def test_parquet_list_items(tmp_path):
    jpg = jpeg_bytes(skimage_photo("astronaut", (50, 50)))
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "0.jpg").write_bytes(jpg)
    abs_path = tmp_path / "elsewhere.jpg"
    abs_path.write_bytes(jpg)
    pq.write_table(pa.table({"path": ["imgs/0.jpg", str(abs_path), "imgs/missing.jpg"],
                             "caption": ["one", "two", None]}), tmp_path / "list.parquet")
    with InputReader(tmp_path / "list.parquet") as r:
        items = r.items()
        assert [(i.key, i.reason, i.caption) for i in items] == [
            ("000000000", None, "one"), ("000000001", None, "two"), ("000000002", "missing_file", None)]
        assert items[0].input_path == str(tmp_path / "imgs" / "0.jpg")
        assert r.read(items[1]) == jpg


def test_unreadable_inputs_become_one_item(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    with InputReader(tmp_path / "empty.tar") as r:
        (item,) = r.items()
    assert item.reason == "unreadable_input" and "empty" in item.detail
    with InputReader(tmp_path / "gone.tar") as r:
        (item,) = r.items()
    assert item.reason == "unreadable_input" and "not found" in item.detail


def test_oversized_items_are_not_read(tmp_path):
    write_tar(tmp_path / "t.tar", [("big.jpg", b"\xff" * 5000), ("small.jpg", b"\xff" * 10)])
    with InputReader(tmp_path / "t.tar", max_bytes=1000) as r:
        assert [i.reason for i in r.items()] == ["too_large", None]


# ----------------------------------------------------------------------------- phash
def test_phash_robust_to_reencode_and_resize_not_to_content():
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry"]
    photos = {n: skimage_photo(n) for n in names}
    hashes = {n: phash(p) for n, p in photos.items()}
    assert all(isinstance(h, int) and -(2**63) <= h < 2**63 for h in hashes.values())
    for n, p in photos.items():
        reencoded = Image.open(io.BytesIO(jpeg_bytes(p, quality=50)))
        smaller = p.resize((p.width * 2 // 3, p.height * 2 // 3), Image.Resampling.BILINEAR)
        assert hamming(hashes[n], phash(reencoded)) <= 6, n
        assert hamming(hashes[n], phash(smaller)) <= 6, n
    distances = [hamming(hashes[a], hashes[b]) for i, a in enumerate(names) for b in names[i + 1 :]]
    assert min(distances) >= 16, distances
    # vectorised form agrees with the scalar form
    arr = np.array(list(hashes.values()), dtype=np.int64)
    assert hamming(arr, hashes["coffee"]).tolist() == [hamming(h, hashes["coffee"]) for h in arr.tolist()]


def test_phash_bits_balanced_and_stable():
    bits = phash_bits(skimage_photo("astronaut"))
    assert bits.shape == (64,) and 28 <= int(bits.sum()) <= 36  # median threshold → about half set
    grey = np.asarray(skimage_photo("astronaut").convert("L"))
    assert phash(grey) == phash(skimage_photo("astronaut"))  # arrays and images agree
    # A flat image has no structure: all AC coefficients 0, no bit above the median.
    assert phash(Image.new("RGB", (64, 64), (120, 30, 200))) == 0
