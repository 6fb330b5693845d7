"""The WebDataset shard format, in one place: names, keys, listing, byte ranges, writing.

Every reader and writer of tar shards (curation ingest/write/audit, the trainer's loader, the eval
feature extractor, the synthetic crawl) goes through this module, so they agree on which members
are images and how keys are formed.

* Keys: a sample key is the member path without its *final* extension (``a/img.0001.jpg`` →
  ``a/img.0001``), unlike the ``webdataset`` package, which splits at the first dot of the basename.
  The members of one sample are consecutive in the tar (the WebDataset convention).
* Images: :data:`IMAGE_EXTENSIONS` is the one list; every reader accepts all of it (the decoder
  reads each format), and the writer names a member after its bytes' real format.
* Only local, uncompressed tars are read: members are addressed by (offset, size) and read in
  place, never extracted.  A damaged tar is listed up to the damage, which is reported as a
  :class:`TarDamage` next to the members found before it.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from braceexpand import braceexpand

# In order of preference when one sample holds several image members.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff")
SIDECAR_EXTENSIONS = ("json", "txt", "cls")
# PIL format → the extension a written member gets (bytes are copied unchanged).
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}

# Fixed header fields so the same members always give the same bytes.
TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z
TAR_MODE = 0o644


def is_image_ext(ext: str) -> bool:
    return ext.lower() in IMAGE_EXTENSIONS


def written_image_ext(ext: str | None, data: bytes) -> str:
    """Extension for an image member holding ``data``: its real format's, else the given one."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Exception:  # noqa: BLE001 - undecodable bytes keep their name (the decoder reports them)
        fmt = None
    if fmt in _FORMAT_EXT:
        return _FORMAT_EXT[fmt]
    e = (ext or "").lower().lstrip(".")
    return e if e in IMAGE_EXTENSIONS else "jpg"


# ---------------------------------------------------------------- patterns and keys
_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}")


def expand_braces(pattern: str) -> list[str]:
    """``lvd-{000..127}.tar`` (padding kept), ``{a,b}`` (nested), several patterns joined by ``::``.

    Expansion is the ``braceexpand`` library's; on top of it unbalanced braces and descending
    ranges are errors, since both are typos that would otherwise name files that do not exist.
    """
    if "::" in pattern:
        return [p for part in pattern.split("::") if part for p in expand_braces(part)]
    depth = 0
    for i, ch in enumerate(pattern):
        if ch in "{}" and (i == 0 or pattern[i - 1] != "\\"):
            depth += 1 if ch == "{" else -1
            if depth < 0:
                break
    if depth != 0:
        raise ValueError(f"unbalanced braces in pattern {pattern!r}")
    for m in _RANGE.finditer(pattern):
        if int(m.group(2)) < int(m.group(1)):
            raise ValueError(f"descending range {m.group(0)} in pattern {pattern!r}")
    return list(braceexpand(pattern))


def split_key(member_name: str) -> tuple[str, str]:
    """``dir/img.0001.jpg`` → (``dir/img.0001``, ``jpg``): the key keeps every dot but the last."""
    slash = member_name.rfind("/")
    dot = member_name.rfind(".")
    if dot <= slash + 1:  # no extension (or a hidden file such as ".x"): the whole name is the key
        return member_name, ""
    return member_name[:dot], member_name[dot + 1 :]


# ---------------------------------------------------------------- listing
class Member(NamedTuple):
    """One tar member: where its data lives (a tuple: resume lists many shards' members)."""

    name: str
    offset: int  # of the data
    size: int
    header: int  # offset of its (first) header block
    kind: str = "file"  # file | directory | symbolic link | hard link | sparse file | special file


class TarDamage(Exception):
    """The tar is damaged at byte ``offset``; ``reason`` is ``truncated_tar`` or ``tar_error``."""

    def __init__(self, reason: str, detail: str, offset: int = 0):
        super().__init__(detail)
        self.reason, self.detail, self.offset = reason, detail, offset


class _NeedsTarfile(Exception):
    """A header type the fast reader does not handle: use the standard library instead."""


_KINDS = {b"1": "hard link", b"2": "symbolic link", b"3": "special file", b"4": "special file",
          b"5": "directory", b"6": "special file"}


def _tar_number(field_: bytes, what: str, offset: int) -> int:
    if field_[:1] == b"\x80":  # GNU base-256 for values that do not fit in octal
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarDamage("tar_error", f"invalid {what} in header at byte {offset}", offset) from None


def _pax_records(data: bytes) -> dict[str, str]:
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")  # without the newline
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members_fast(raw, file_size: int) -> Iterator[Member]:
    """Members from ustar/GNU/pax headers parsed directly.

    Hand-written because exact resume fast-forwards a stream through the headers of many shards:
    this is ~10x faster than ``tarfile`` (no TarInfo objects).  Raises :class:`TarDamage` at the
    first damage and :class:`_NeedsTarfile` at a header type it does not know.
    """
    offset = 0
    long_name: str | None = None
    pax: dict[str, str] = {}
    start = 0  # header of the current member (its long-name / pax headers come first)
    while True:
        raw.seek(offset)
        block = raw.read(512)
        if len(block) < 512:
            if offset == 0 and not block:
                raise TarDamage("tar_error", "empty file", 0)
            raise TarDamage("truncated_tar", "archive ends without its end-of-archive block", offset)
        if block.count(0) == 512:
            return
        stored = _tar_number(block[148:156], "checksum", offset)
        if stored != sum(block[:148]) + 256 + sum(block[156:]):  # checksum field counts as spaces
            signed = sum(b - 256 if b > 127 else b for b in block[:148] + block[156:]) + 256
            if stored != signed:
                raise TarDamage("tar_error", f"invalid header (bad checksum) at byte {offset}", offset)
        size = _tar_number(block[124:136], "size", offset)
        flag = block[156:157]
        data_offset = offset + 512
        if flag in (b"L", b"x", b"g"):
            if data_offset + size > file_size:
                raise TarDamage("truncated_tar", "extended header is cut off", offset)
            raw.seek(data_offset)
            data = raw.read(size)
            if flag == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            elif flag == b"x":
                try:
                    pax = _pax_records(data)
                except ValueError:
                    raise TarDamage("tar_error", f"invalid pax header at byte {offset}", offset) from None
            # "g" (global pax header) holds nothing a sample needs.
        elif flag in (b"0", b"\0", b"7") or flag in _KINDS:
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = block[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if block[257:262] == b"ustar" and block[345:346] != b"\0" and block[262:263] == b"\0":
                    prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    name = f"{prefix}/{name}"
            if flag in _KINDS:
                yield Member(name.rstrip("/") if flag == b"5" else name, start, 0, start, _KINDS[flag])
                size = 0 if flag in (b"1", b"2") else size  # links carry no data blocks
            else:
                if "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        raise TarDamage("tar_error", f"invalid pax size at byte {offset}", offset) from None
                if data_offset + size > file_size:
                    raise TarDamage("truncated_tar", f"member {name!r} needs bytes up to {data_offset + size}, "
                                    f"file has {file_size}", start)
                yield Member(name, data_offset, size, start)
            long_name, pax = None, {}
        else:
            raise _NeedsTarfile(flag)
        offset = data_offset + (size + 511) // 512 * 512
        if flag not in (b"L", b"x", b"g"):
            start = offset


def _members_tarfile(raw, file_size: int) -> Iterator[Member]:
    """Same contract as :func:`_members_fast`, through the standard library (rare formats)."""
    raw.seek(0)
    try:
        tf = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 - closed with ``raw``
    except (tarfile.TarError, EOFError) as exc:
        raise TarDamage("truncated_tar" if 0 < file_size < 1024 else "tar_error", str(exc), 0) from None
    while True:
        at = tf.offset
        try:
            m = tf.next()
        except (tarfile.TarError, EOFError) as exc:
            raise TarDamage("truncated_tar", f"damaged archive after byte {at}: {exc}", at) from None
        if m is None:
            # tarfile stops silently at a damaged header: check for the zero end-of-archive block.
            raw.seek(tf.offset)
            block = raw.read(512)
            if len(block) < 512:
                raise TarDamage("truncated_tar", "archive ends without its end-of-archive block", tf.offset)
            if block.count(0) != 512:
                raise TarDamage("tar_error", f"invalid tar header at byte {tf.offset}", tf.offset)
            return
        if m.isreg() and not m.issparse():
            if m.offset_data + m.size > file_size:
                raise TarDamage("truncated_tar", f"member {m.name!r} needs bytes up to {m.offset_data + m.size}, "
                                f"file has {file_size}", m.offset)
            yield Member(m.name, m.offset_data, m.size, m.offset)
        else:
            kind = ("directory" if m.isdir() else "symbolic link" if m.issym() else "hard link" if m.islnk()
                    else "sparse file" if m.issparse() else "special file")
            yield Member(m.name, m.offset, 0, m.offset, kind)


@dataclass
class TarListing:
    members: list[Member]
    damage: TarDamage | None = None  # set when the archive is damaged after ``members``
    file_size: int = 0


def list_tar(path: str | os.PathLike, use_tarfile: bool = False) -> TarListing:
    """Every member of a tar up to its first damage.  OSError if it cannot be opened at all.

    ``use_tarfile`` skips the fast header parser (tests compare the two)."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as raw:
        if raw.read(2) == b"\x1f\x8b":
            return TarListing([], TarDamage("tar_error", "gzip-compressed tars are not supported"), file_size)
        for lister in (_members_tarfile,) if use_tarfile else (_members_fast, _members_tarfile):
            members: list[Member] = []
            try:
                for m in lister(raw, file_size):
                    members.append(m)  # noqa: PERF402 - kept incrementally: damage ends the loop
            except _NeedsTarfile:
                continue
            except TarDamage as exc:
                return TarListing(members, exc, file_size)
            return TarListing(members, None, file_size)
    raise AssertionError("unreachable: the tarfile lister handles every header type")


class Sample:
    """The members sharing one key; ``members`` maps the lower-cased extension to its member."""

    __slots__ = ("key", "members")

    def __init__(self, key: str, members: dict[str, Member] | None = None):
        self.key = key
        self.members = {} if members is None else members

    def image(self) -> tuple[str, Member] | None:
        for ext in IMAGE_EXTENSIONS:
            m = self.members.get(ext)
            if m is not None:
                return ext, m
        return None


def group_samples(members: Iterable[Member]) -> Iterator[Sample]:
    """Runs of consecutive regular members sharing a key (the WebDataset convention), in tar order.

    Within a sample the first member of an extension wins.  Samples are yielded as they end, so
    listing a shard keeps nothing but its members alive (resume walks many shards)."""
    sample: Sample | None = None
    for m in members:
        if m.kind != "file":
            continue
        key, ext = split_key(m.name)
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample
            sample = Sample(key)
        sample.members.setdefault(ext.lower(), m)
    if sample is not None:
        yield sample


# ---------------------------------------------------------------- byte ranges
class ShortRead(OSError):
    """The file ends inside the requested range (it shrank after it was listed)."""


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            raise ShortRead(f"unexpected end of file at byte {offset + got} (wanted {size} bytes at {offset})")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def read_range(path: str | os.PathLike, offset: int = -1, size: int = -1) -> bytes:
    """``size`` bytes at ``offset`` (a member in place), or the whole file when ``offset < 0``.

    A file shorter than the range raises OSError instead of returning fewer bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if offset < 0:
            offset, size = 0, os.fstat(fd).st_size
        return _pread_all(fd, size, offset)
    finally:
        os.close(fd)


class RangeReader:
    """Reads (path, offset, size) ranges keeping a few files open; safe to share between threads."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: str, offset: int, size: int) -> bytes:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                fd = os.open(path, os.O_RDONLY)
                self._fds[path] = fd
                while len(self._fds) > self.max_open:
                    os.close(self._fds.popitem(last=False)[1])
            else:
                self._fds.move_to_end(path)
            return _pread_all(fd, size, offset)  # under the lock: an evicted fd is never read

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> RangeReader:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- writing
class ShardWriter:
    """An uncompressed tar written atomically, with fixed headers: same members → same bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self._stack = contextlib.ExitStack()
        self._tar: tarfile.TarFile | None = None

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 - py3.10 has no typing.Self
        from dinov2.utils.io import atomic_open

        f = self._stack.enter_context(atomic_open(self.path, "wb"))
        self._tar = self._stack.enter_context(tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT))
        return self

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        assert self._tar is not None, "use ShardWriter as a context manager"
        self._tar.addfile(info, io.BytesIO(data))

    def __exit__(self, *exc) -> bool | None:
        return self._stack.__exit__(*exc)


def write_shard(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``(member name, bytes)`` pairs as one shard, atomically."""
    with ShardWriter(path) as w:
        for name, data in members:
            w.add(name, data)
