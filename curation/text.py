"""Text from inputs as Parquet can store it.

Names and metadata come from files users hand us: a tar member or file name with bytes that are not
UTF-8 arrives (through ``surrogateescape``) as a str holding lone surrogates U+DC80..U+DCFF, and a
JSON sidecar may hold an escaped lone surrogate (``"\\ud800"``).  Arrow refuses both, which would
fail a whole shard on every rerun.  Such characters are written as ``\\xNN`` (the original byte) or
``\\uXXXX`` (a lone surrogate from text), so the name stays readable and distinct; valid text is
returned unchanged.  Paths needed for reading keep their raw bytes beside (``raw_path_bytes``).
"""
from __future__ import annotations

import os
import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    code = ord(m.group(0))
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def safe_text(text: str) -> str:
    """``text`` with lone surrogates escaped (unchanged when it is valid Unicode)."""
    return _SURROGATE.sub(_escape, text)


def needs_escape(text: str | None) -> bool:
    return text is not None and _SURROGATE.search(text) is not None


def raw_path_bytes(path: str | None) -> bytes | None:
    """The file system bytes of ``path`` when its text form had to be escaped, else None."""
    return os.fsencode(path) if needs_escape(path) else None


def stored_path(text: str, raw: bytes | None) -> str:
    """The real path of a stored (``input_path``, ``input_path_bytes``) pair."""
    return os.fsdecode(raw) if raw else text
