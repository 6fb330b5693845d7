"""Renaming rules shared by the state-dict adapters: ``official template <-> foreign template``.

A template names one tensor, with ``{i}`` for a block index and ``{p}`` for ``weight`` / ``bias``
(e.g. ``blocks.{i}.norm1.{p}`` <-> ``encoder.layer.{i}.norm1.{p}``).  Renaming is a lookup, never
a guess: a key no rule matches is reported, not dropped.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

_FIELDS = {"i": r"(?P<i>\d+)", "p": r"(?P<p>weight|bias)"}


class KeyMapError(ValueError):
    """A state dict does not fit an adapter's key map (the message names the keys)."""


def preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[ip]\})", template)
    return re.compile("^" + "".join(_FIELDS[p[1]] if p in ("{i}", "{p}") else re.escape(p) for p in parts) + "$")


class KeyMap:
    """One-to-one renames between the official layout and a foreign one, in both directions."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._to_official = [(_compile(foreign), official) for official, foreign in self.pairs]
        self._from_official = [(_compile(official), foreign) for official, foreign in self.pairs]

    @staticmethod
    def _apply(rules: list[tuple[re.Pattern[str], str]], key: str) -> str | None:
        for pattern, template in rules:
            m = pattern.match(key)
            if m:
                return template.format(**m.groupdict())
        return None

    def to_official(self, key: str) -> str | None:
        return self._apply(self._to_official, key)

    def from_official(self, key: str) -> str | None:
        return self._apply(self._from_official, key)
