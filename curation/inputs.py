"""Curation inputs: patterns → the sorted list of inputs (tar shards, image folders, Parquet lists).

One input is one shard of its source; shard ids ``s000000…`` follow this sorted list.
"""
from __future__ import annotations

import glob
import os
from collections.abc import Iterable
from pathlib import Path

from dinov2.data.shards import expand_braces as _expand_braces


class InputError(ValueError):
    """An input pattern is missing, matches nothing, or is of an unsupported kind."""


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion (``a-{000..003}.tar``, ``{x,y}/*.tar``), shared with the trainer."""
    try:
        return _expand_braces(pattern)
    except ValueError as exc:
        raise InputError(f"bad input pattern {pattern!r}: {exc}") from None


def input_kind(path: str | Path) -> str:
    """``"tar"``, ``"folder"`` or ``"parquet"`` for an existing input; InputError otherwise."""
    p = Path(path)
    if p.is_dir():
        return "folder"
    name = p.name.lower()
    if name.endswith(".tar") and p.is_file():
        return "tar"
    if name.endswith(".parquet") and p.is_file():
        return "parquet"
    if not p.exists():
        raise InputError(f"input not found: {path}")
    if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")):
        raise InputError(
            f"compressed tar not supported: {path} (items are read in place by byte offset; "
            "use uncompressed .tar shards)"
        )
    raise InputError(f"unsupported input {path}: expected a .tar shard, an image folder or a .parquet list")


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Expand brace ranges and globs; return absolute, sorted, de-duplicated inputs.

    Each result is a tar shard, an image folder or a Parquet list (with a ``path``
    column).  A missing input, a glob matching nothing, or an unsupported kind
    raises :class:`InputError` naming it (all missing ones are listed together).
    """
    if isinstance(patterns, (str, Path)):
        patterns = [str(patterns)]
    found: set[str] = set()
    missing: list[str] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        for candidate in expand_braces(pattern):
            if glob.has_magic(candidate):
                matches = glob.glob(candidate, recursive=True)
                if not matches:
                    missing.append(f"{candidate} (pattern matched nothing)")
                found.update(os.path.abspath(m) for m in matches)
            elif os.path.exists(candidate):
                found.add(os.path.abspath(candidate))
            else:
                missing.append(candidate)
    if missing:
        shown = ", ".join(missing[:5]) + (f" … and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise InputError(f"{len(missing)} input(s) missing: {shown}")
    result = sorted(found)
    for path in result:
        if input_kind(path) == "parquet":
            _check_parquet_list(path)
    if not result:
        raise InputError("no inputs given")
    return result


def _check_parquet_list(path: str) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad input list
        raise InputError(f"cannot read Parquet list {path}: {exc}") from None
    if "path" not in names:
        raise InputError(f"Parquet list {path} has no 'path' column (columns: {', '.join(names)})")
