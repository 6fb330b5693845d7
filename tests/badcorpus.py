"""A small corpus of tar shards full of the things a web crawl really contains.

``make_bad_corpus(dir)`` writes three shards built from real photos (scikit-image
samples) and returns ``{expected id: expected reason}`` (``"ok"`` for items that
must decode and embed), with ids as the embed stage names them when ``dir``'s
``*.tar`` files are one source (sorted → ``s000000``, ``s000001``, ``s000002``).

    bad-000.tar  good JPEG/PNG/WebP (+ json/txt/cls sidecars), random bytes, corrupt
                 PNG data, truncated JPEG, zero-byte file, a non-image member,
                 duplicate keys (same name twice; same key with two extensions),
                 a dotted key (a.b.c.jpg + a.b.c.json), CMYK JPEG, 16-bit PNG,
                 palette PNG, RGBA PNG, greyscale JPEG, EXIF-rotated JPEG
                 (orientation 6), a PNG header declaring 50000×50000, members named
                 ``../evil.jpg`` and ``/abs.jpg``, a directory and a symlink.
    bad-001.tar  two good members, then cut in the middle of the third member.
    bad-002.tar  not a tar at all.
"""
from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from conftest import encode, skimage_photo
from PIL import Image

EXIF_KEY = "exif_rot6"
EXIF_STORED_SIZE = (120, 80)  # (width, height) as stored
EXIF_DECODED_SIZE = (80, 120)  # after applying orientation 6 (rotate 90°)
DOTTED_KEY = "a.b.c"
DOTTED_URL = "https://example.com/photos/a.b.c.jpg"
GOOD_JPEG_CAPTION = "an astronaut in a white suit"
ORIG_MODES = {"cmyk": "CMYK", "palette": "P", "rgba": "RGBA", "gray": "L"}
UNSAFE_NAMES = ("../evil.jpg", "/abs.jpg")




def _png_declaring(width: int, height: int) -> bytes:
    """A valid tiny PNG whose IHDR claims ``width × height`` (a decompression bomb header)."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def _corrupt_png(img: Image.Image) -> bytes:
    data = bytearray(encode(img, "PNG"))
    i = data.index(b"IDAT")
    data[i + 10 : i + 60] = bytes(50)  # zero a stretch of the deflate stream
    return bytes(data)


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 1_700_000_000  # fixed: identical bytes on every run
    tf.addfile(info, io.BytesIO(payload))


def _tar_bytes(members: list[tuple[str, bytes | str]]) -> tuple[bytes, dict[str, int]]:
    """Tar with ``(name, bytes)`` files; ``(name, "DIR")`` dirs; ``(name, "->target")`` symlinks.

    Returns the bytes and each file member's data offset.
    """
    buf = io.BytesIO()
    offsets: dict[str, int] = {}
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, payload in members:
            if payload == "DIR":
                info = tarfile.TarInfo(name)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
                tf.addfile(info)
            elif isinstance(payload, str) and payload.startswith("->"):
                info = tarfile.TarInfo(name)
                info.type, info.linkname, info.mtime = tarfile.SYMTYPE, payload[2:], 1_700_000_000
                tf.addfile(info)
            else:
                _add(tf, name, payload)
                offsets[name] = tf.offset - tarfile.BLOCKSIZE * ((len(payload) + 511) // 512)
    return buf.getvalue(), offsets


def make_bad_corpus(directory: str | Path, source: str = "pool") -> dict[str, str]:
    """Write the corpus into ``directory``; return ``{id: expected reason or "ok"}``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    astronaut = skimage_photo("astronaut", (160, 160))
    coffee = skimage_photo("coffee", (150, 100))
    chelsea = skimage_photo("chelsea", (135, 90))
    rocket = skimage_photo("rocket", (96, 144))
    jpg = encode(astronaut, "JPEG", quality=90)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    rotated = encode(skimage_photo("chelsea", EXIF_STORED_SIZE), "JPEG", quality=90, exif=exif.tobytes())
    grey16 = (np.asarray(coffee.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    png16 = encode(Image.fromarray(grey16), "PNG")  # uint16 array → mode I;16
    rgba = coffee.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(coffee.size))

    members: list[tuple[str, bytes | str]] = [
        ("good_jpeg.jpg", jpg),
        ("good_jpeg.json", json.dumps({"url": "https://example.com/astronaut.jpg", "key": "good_jpeg"}).encode()),
        ("good_jpeg.txt", GOOD_JPEG_CAPTION.encode()),
        ("good_jpeg.cls", b"3"),
        ("good_png.png", encode(coffee, "PNG")),
        ("good_webp.webp", encode(chelsea, "WEBP", quality=85)),
        ("random_bytes.jpg", np.random.default_rng(0).bytes(4000)),
        ("corrupt.png", _corrupt_png(rocket)),
        ("truncated.jpg", jpg[: len(jpg) // 2]),
        ("empty.jpg", b""),
        ("notes.md", b"# not an image\n"),
        ("dup.jpg", encode(rocket, "JPEG")),
        ("dup.jpg", encode(coffee, "JPEG")),
        ("dup2.jpg", encode(chelsea, "JPEG")),
        ("dup2.png", encode(chelsea, "PNG")),
        (f"{DOTTED_KEY}.jpg", encode(rocket, "JPEG", quality=80)),
        (f"{DOTTED_KEY}.json", json.dumps({"url": DOTTED_URL, "caption": "a rocket"}).encode()),
        ("cmyk.jpg", encode(coffee.convert("CMYK"), "JPEG")),
        ("png16.png", png16),
        ("palette.png", encode(chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG")),
        ("rgba.png", encode(rgba, "PNG")),
        ("gray.jpg", encode(astronaut.convert("L"), "JPEG")),
        (f"{EXIF_KEY}.jpg", rotated),
        ("huge.png", _png_declaring(50000, 50000)),
        ("../evil.jpg", jpg),
        ("/abs.jpg", jpg),
        ("somedir", "DIR"),
        ("link.jpg", "->good_jpeg.jpg"),
    ]
    data, _ = _tar_bytes(members)
    (d / "bad-000.tar").write_bytes(data)
    s0 = f"{source}/s000000/"
    expected = {
        "good_jpeg": "ok", "good_png": "ok", "good_webp": "ok",
        "random_bytes": "not_an_image", "corrupt": "corrupt", "truncated": "truncated", "empty": "empty",
        "notes": "not_an_image", "dup": "ok", "dup#2": "duplicate_key", "dup2": "ok", "dup2#2": "duplicate_key",
        DOTTED_KEY: "ok", "cmyk": "ok", "png16": "ok", "palette": "ok", "rgba": "ok", "gray": "ok",
        EXIF_KEY: "ok", "huge": "too_large", "../evil": "unsafe_member_name", "/abs": "unsafe_member_name",
        "somedir": "not_a_file", "link": "not_a_file",
    }
    result = {s0 + k: v for k, v in expected.items()}

    # A tar cut in the middle of its third member (a killed writer, a partial download).
    cut_members = [("t0.jpg", encode(coffee, "JPEG")), ("t1.png", encode(rocket, "PNG")), ("t2.jpg", jpg)]
    data, offsets = _tar_bytes(cut_members)
    (d / "bad-001.tar").write_bytes(data[: offsets["t2.jpg"] + len(jpg) // 2])
    s1 = f"{source}/s000001/"
    result.update({s1 + "t0": "ok", s1 + "t1": "ok", s1 + "__truncated_tar__": "truncated_tar"})

    (d / "bad-002.tar").write_bytes(b"this is not a tar archive\n" * 40)
    result[f"{source}/s000002/__unreadable_input__"] = "unreadable_input"
    return result
