"""List curation inputs and iterate their items safely (no extraction, no trust in names).

Input kinds (one input = one shard of a source):

- **tar shard** (``*.tar``, uncompressed) as img2dataset/webdataset write it:
  ``{key}.jpg|png|webp…`` plus sidecars ``{key}.json`` (url, caption, …),
  ``{key}.txt`` (caption), ``{key}.cls``.  Keys, image extensions and the tar
  listing are :mod:`dinov2.data.shards`' (dotted keys ``a.b.c.jpg`` stay whole).
  Members are read in place (never extracted); names are only ever used as keys.
- **image folder**: every regular file below it, recursively, in sorted order;
  hidden files and folders (leading ``.``) are ignored; ``x.json``/``x.txt``
  beside ``x.jpg`` are sidecars as in tars.
- **Parquet list** (``*.parquet``) with a ``path`` column (relative paths are
  relative to the Parquet file) and optional ``key``, ``url``, ``caption``
  columns; without ``key`` the row number (``000000042``) is the key.

Every item carries the location of its original bytes: ``input_path`` is the
file that holds them and ``[byte_offset, byte_offset + byte_size)`` the range
(the tar for tar members; the image file itself, offset 0, for folder and list
items).  ``read_bytes(input_path, byte_offset, byte_size)`` reads them back.

Names and sidecar text that are not valid UTF-8 (tar names with stray bytes, file
names in another encoding, JSON with lone surrogate escapes) are stored escaped
(:func:`curation.text.safe_text`); the real path stays on the item for reading.

Problems found while listing become items with a ``reason`` (see ``REASONS``)
instead of exceptions, so one bad member never stops a shard.  A damaged tar is
read up to the damage; the rest becomes one ``truncated_tar`` item.
"""
from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from dinov2.data.shards import SIDECAR_EXTENSIONS, RangeReader, is_image_ext, list_tar, read_range, split_key

from .inputs import InputError, expand_inputs, input_kind
from .text import safe_text

__all__ = ["InputError", "InputReader", "Item", "expand_inputs", "read_bytes"]  # expand_inputs: re-exported

# Reasons produced while listing (decoding adds dinov2.data.decode.REASONS).
REASONS = (
    "unsafe_member_name",  # '../x' or '/x' in a tar: reported, never used as a path
    "not_an_image",  # a member/file that is neither an image nor an image's sidecar
    "duplicate_key",  # second (third, …) image with a key already seen in this input
    "truncated_tar",  # the tar ends (or is damaged) mid-archive: everything after the damage
    "unreadable_input",  # the input cannot be opened/parsed at all (one item for the whole input)
    "not_a_file",  # directory, link, device, sparse member
    "missing_file",  # a Parquet-list path that does not exist / is not a regular file
    "too_large",  # more than max_bytes of encoded data
    "read_error",  # an I/O error while reading the bytes
)

SIDE_CAR_MAX_BYTES = 1 << 20  # sidecars are small; a 1 GiB "json" is not metadata
DEFAULT_MAX_BYTES = 256 << 20  # encoded bytes per image read into memory
TRUNCATED_KEY = "__truncated_tar__"
UNREADABLE_KEY = "__unreadable_input__"


# ----------------------------------------------------------------------------- items
@dataclass
class Item:
    """One input item: an image to decode, or a problem found while listing."""

    key: str  # member path minus its final extension (dots kept)
    member: str  # member name in the tar / path relative to the folder / path as listed
    ext: str  # final extension as written ("" if none)
    input_path: str  # file that holds the bytes
    byte_offset: int
    byte_size: int
    url: str | None = None
    caption: str | None = None
    reason: str | None = None  # set when the item failed before decoding
    detail: str | None = None
    id_key: str = ""  # key made unique within the input (``key#2`` for repeats); used in ids


def is_unsafe_name(name: str) -> bool:
    """True for absolute paths, ``..`` components, backslashes paths, NUL or drive letters."""
    if not name or "\x00" in name:
        return True
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return True
    parts = re.split(r"[/\\]", name)
    return any(part == ".." for part in parts)


def read_bytes(input_path: str, byte_offset: int, byte_size: int) -> bytes:
    """The original bytes of an item (as recorded in the embed parquet)."""
    return read_range(input_path, byte_offset, byte_size)


def _parse_sidecars(sidecars: dict[str, bytes]) -> tuple[str | None, str | None]:
    url = caption = None
    raw = sidecars.get("json")
    if raw is not None:
        try:
            meta = json.loads(raw.decode("utf-8", errors="replace"))
        except ValueError:
            meta = None
        if isinstance(meta, dict):
            u, c = meta.get("url"), meta.get("caption")
            url = str(u) if u is not None else None
            caption = str(c) if c is not None else None
    if caption is None and "txt" in sidecars:
        caption = sidecars["txt"].decode("utf-8", errors="replace").strip() or None
    return url, caption


@dataclass
class _Entry:
    """A raw listing entry (tar member or folder file) before grouping by key."""

    name: str
    kind: str  # "file" | "other"
    input_path: str
    offset: int
    size: int
    other_detail: str = ""


class InputReader:
    """Lists the items of one input and reads their bytes (thread-safe ``read``).

    Use as a context manager; ``items()`` returns the full item list (metadata
    only, bytes are read lazily by :meth:`read`, which may be called from
    worker threads concurrently).
    """

    def __init__(self, input_path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.input_path = os.path.abspath(str(input_path))
        self.max_bytes = max_bytes
        self._reader = RangeReader(max_open=4)
        self._items: list[Item] | None = None

    def __enter__(self) -> InputReader:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._reader.close()

    # -- listing
    def items(self) -> list[Item]:
        if self._items is None:
            try:
                kind = input_kind(self.input_path)
            except InputError as exc:
                self._items = [self._whole_input_error(str(exc))]
            else:
                try:
                    if kind == "tar":
                        self._items = self._tar_items()
                    elif kind == "folder":
                        self._items = self._folder_items()
                    else:
                        self._items = self._parquet_items()
                except Exception as exc:  # noqa: BLE001 - a bad input must never stop the job
                    self._items = [self._whole_input_error(f"{type(exc).__name__}: {exc}")]
            for item in self._items:
                _escape_text(item)
            _assign_unique_ids(self._items)
        return self._items

    def _whole_input_error(self, detail: str) -> Item:
        return Item(
            key=UNREADABLE_KEY, member="", ext="", input_path=self.input_path, byte_offset=0,
            byte_size=0, reason="unreadable_input", detail=detail,
        )

    def _tar_items(self) -> list[Item]:
        file_size = os.path.getsize(self.input_path)
        if file_size == 0:
            return [self._whole_input_error("empty file (0 bytes)")]
        if file_size < 512:
            return [self._truncated_item(0, "", f"file is {file_size} bytes, shorter than one tar header", file_size)]
        listing = list_tar(self.input_path)
        damage = listing.damage
        if damage is not None and not listing.members and damage.reason == "tar_error":
            return [self._whole_input_error(f"not a readable tar: {damage.detail}")]
        entries = [
            _Entry(m.name, "file" if m.kind == "file" else "other", self.input_path, m.offset, m.size,
                   "" if m.kind == "file" else m.kind)
            for m in listing.members
        ]
        items = self._group(entries, tar=True)
        if damage is not None:
            items.append(self._truncated_item(damage.offset, "", damage.detail, file_size))
        return items

    def _truncated_item(self, offset: int, member: str, detail: str, file_size: int) -> Item:
        return Item(
            key=TRUNCATED_KEY, member=member, ext="", input_path=self.input_path, byte_offset=offset,
            byte_size=max(0, file_size - offset), reason="truncated_tar", detail=detail,
        )

    def _folder_items(self) -> list[Item]:
        root = self.input_path
        entries: list[_Entry] = []
        for dirpath, dirnames, filenames in os.walk(root):  # does not follow directory links
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                full = os.path.join(dirpath, fname)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                try:
                    st = os.stat(full)  # follows file symlinks: linked photo folders are common
                except OSError as exc:
                    entries.append(_Entry(rel, "other", full, 0, 0, f"cannot stat: {exc}"))
                    continue
                if stat.S_ISREG(st.st_mode):
                    entries.append(_Entry(rel, "file", full, 0, st.st_size))
                else:
                    entries.append(_Entry(rel, "other", full, 0, 0, "not a regular file (fifo/socket/device)"))
        # os.walk visits a folder's files before its subfolders; sort by relative path instead.
        entries.sort(key=lambda e: e.name)
        return self._group(entries, tar=False)

    def _parquet_items(self) -> list[Item]:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.input_path)
        except Exception as exc:  # noqa: BLE001
            return [self._whole_input_error(f"cannot read Parquet list: {exc}")]
        if "path" not in table.column_names:
            return [self._whole_input_error("Parquet list has no 'path' column")]
        cols = {c: table.column(c).to_pylist() for c in ("path", "key", "url", "caption") if c in table.column_names}
        base = os.path.dirname(self.input_path)
        items: list[Item] = []
        seen: set[str] = set()
        for row, listed in enumerate(cols["path"]):
            key = cols["key"][row] if "key" in cols and cols["key"][row] is not None else f"{row:09d}"
            key = str(key)
            listed = "" if listed is None else str(listed)
            full = os.path.abspath(os.path.join(base, os.path.expanduser(listed))) if listed else ""
            ext = split_key(os.path.basename(listed))[1]
            item = Item(
                key=key, member=listed, ext=ext, input_path=full, byte_offset=0, byte_size=0,
                url=_opt_str(cols, "url", row), caption=_opt_str(cols, "caption", row),
            )
            if key in seen:
                item.reason, item.detail = "duplicate_key", f"key {key!r} already listed"
            elif not listed:
                item.reason, item.detail = "missing_file", "empty path"
            else:
                try:
                    st = os.stat(full)
                except OSError as exc:
                    item.reason, item.detail = "missing_file", f"{full}: {exc.strerror or exc}"
                else:
                    if not stat.S_ISREG(st.st_mode):
                        item.reason, item.detail = "missing_file", f"{full} is not a regular file"
                    else:
                        item.byte_size = st.st_size
                        self._check_size(item)
            seen.add(key)
            items.append(item)
        return items

    def _check_size(self, item: Item) -> None:
        if item.reason is None and item.byte_size > self.max_bytes:
            item.reason = "too_large"
            item.detail = f"{item.byte_size} encoded bytes exceed the {self.max_bytes}-byte limit"

    def _group(self, entries: list[_Entry], tar: bool) -> list[Item]:
        """Group entries by key: images become items, sidecars attach to them, the rest is reported."""
        out: list[tuple[int, Item]] = []
        images: dict[str, int] = {}  # key -> position of its image item in `out`
        sidecars: dict[str, dict[str, _Entry]] = {}
        others: list[tuple[int, _Entry, str, str]] = []
        for pos, e in enumerate(entries):
            key, ext = split_key(e.name.rstrip("/") if e.kind == "other" else e.name)
            low = ext.lower()

            def make(reason: str | None, detail: str | None, _e=e, _key=key, _ext=ext) -> Item:
                return Item(
                    key=_key, member=_e.name, ext=_ext, input_path=_e.input_path,
                    byte_offset=_e.offset, byte_size=_e.size, reason=reason, detail=detail,
                )

            if tar and is_unsafe_name(e.name):
                out.append((pos, make("unsafe_member_name", f"member name {e.name!r} escapes the archive")))
            elif e.kind != "file":
                out.append((pos, make("not_a_file", e.other_detail)))
            elif is_image_ext(low):
                if key in images:
                    first = out[images[key]][1].member
                    out.append((pos, make("duplicate_key", f"key {key!r} already used by {first!r}")))
                else:
                    images[key] = len(out)
                    item = make(None, None)
                    self._check_size(item)
                    out.append((pos, item))
            elif low in SIDECAR_EXTENSIONS:
                sidecars.setdefault(key, {}).setdefault(low, e)  # first one wins
            else:
                others.append((pos, e, key, ext))
        for pos, e, key, ext in others:
            if key not in images:  # a non-image member of an image key is just another sidecar
                out.append((pos, Item(
                    key=key, member=e.name, ext=ext, input_path=e.input_path, byte_offset=e.offset,
                    byte_size=e.size, reason="not_an_image",
                    detail=f"extension {ext!r} is not an image type" if ext else "no file extension",
                )))
        # Metadata for image items.
        for key, idx in images.items():
            side = sidecars.get(key)
            if side:
                raw = {}
                for ext, e in side.items():
                    if e.size <= SIDE_CAR_MAX_BYTES:
                        try:
                            raw[ext] = self._read_range(e.input_path, e.offset, e.size)
                        except OSError:
                            pass  # unreadable metadata is not fatal for the image
                item = out[idx][1]
                item.url, item.caption = _parse_sidecars(raw)
        out.sort(key=lambda pair: pair[0])
        return [item for _, item in out]

    # -- reading
    def _read_range(self, path: str, offset: int, size: int) -> bytes:
        return self._reader.read(path, offset, size)

    def read(self, item: Item) -> bytes:
        """The item's original bytes (raises OSError on I/O failure)."""
        return self._read_range(item.input_path, item.byte_offset, item.byte_size)


def _opt_str(cols: dict, name: str, row: int) -> str | None:
    if name not in cols:
        return None
    value = cols[name][row]
    return None if value is None else str(value)


def _escape_text(item: Item) -> None:
    """Names and sidecar text as Parquet can store them (the real path stays for reading)."""
    for name in ("key", "member", "url", "caption", "detail"):
        value = getattr(item, name)
        if value is not None:
            setattr(item, name, safe_text(value))


def _assign_unique_ids(items: list[Item]) -> None:
    """``id_key`` = key, or ``key#2``, ``key#3``… when the key was already used in this input."""
    used: set[str] = set()
    for item in items:
        candidate, n = item.key, 1
        while candidate in used:
            n += 1
            candidate = f"{item.key}#{n}"
        used.add(candidate)
        item.id_key = candidate
