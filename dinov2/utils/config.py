"""Typed configuration loading shared by the trainer and the curation pipeline.

A config is a dataclass schema (OmegaConf "structured config").  YAML files and
``key=value`` command-line overrides are merged on top of the schema's defaults;
unknown keys and values of the wrong type are errors that name the offending key.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override is invalid (the message names the key)."""


def _describe(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    if raw == "":
        return key, ""
    # YAML parsing gives ints, floats, bools, null and lists ([a,b]) their natural types.
    try:
        return key, OmegaConf.create(f"v: {raw}")["v"]
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(
            f"override '{item}': value is not valid YAML ({first}); quote strings that contain braces "
            "or colons, e.g. 'data.sources=[{pattern: \"/data/a-{000..003}.tar\"}]'"
        ) from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a validated ``schema`` instance from defaults + YAML file + overrides."""
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass schema")
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file not found: {path}")
            try:
                file_cfg = OmegaConf.load(path) or OmegaConf.create({})
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
            cfg = OmegaConf.merge(cfg, file_cfg)
        for item in overrides:
            key, value = _parse_override(item)
            nested: Any = value
            for part in reversed(key.split(".")):
                nested = {part: nested}
            # Merging (rather than OmegaConf.update) lets `name.field=value` create a new entry of a
            # dict-typed node (e.g. a new embedder) with its schema's defaults, while dataclass nodes
            # stay closed: unknown keys there are errors.
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.create(nested))
            except OmegaConfBaseException as exc:
                raise ConfigError(f"override '{item}': {_describe(exc)}") from None
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as exc:
        where = f" in {path}" if path is not None else ""
        raise ConfigError(f"invalid config{where}: {_describe(exc)}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """Serialize a config dataclass instance to YAML (for saving next to outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b.c": value}`` (for naming changed config keys)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def one_line(exc: BaseException) -> str:
    """An exception as one line for a CLI (multi-line library messages joined)."""
    text = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__
