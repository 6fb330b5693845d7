"""`CurationConfig`: one typed config for the whole pipeline, composed of the stages' configs.

Loaded with ``dinov2.utils.config.load_config(CurationConfig, path, overrides)``:
unknown keys and wrong types are errors naming the key; :meth:`CurationConfig.validate`
adds the cross-field checks (embedder names referenced by stages exist, names are
safe to use in file names, thresholds in range, …).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dinov2.data.decode import DEFAULT_MAX_PIXELS
from dinov2.utils.config import ConfigError, load_config

from .calibrate import CalibrateConfig
from .choices import RetrieveMethod, coerce
from .decontaminate import DecontamConfig
from .dedup import DedupConfig
from .embedders import EmbedderConfig
from .ingest import DEFAULT_MAX_BYTES
from .jobs import ExecutorConfig
from .retrieve import QuerySetConfig as RetrieveQuerySetConfig
from .retrieve import RetrieveConfig
from .sharding import ShardingConfig
from .write import WriteConfig

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")  # used in file names (<source>, .<embedder>.npy)


@dataclass
class EmbedStageConfig:
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb limit per image
    max_bytes: int = DEFAULT_MAX_BYTES  # encoded bytes per image read into memory
    num_workers: int = 2  # decode threads per task (speed only)


@dataclass
class QuerySetConfig:
    """A curated query set: its images and how retrieval uses it."""

    inputs: list[str] = field(default_factory=list)  # patterns: tars, folders, parquet lists
    method: RetrieveMethod = RetrieveMethod.auto  # see curation/retrieve.py
    k: int = 0  # sample-based neighbours per query; 0 = retrieve.sample_k
    max_per_set: int = 0  # 0 = retrieve.max_per_set


@dataclass
class CurationConfig:
    output_dir: str = ""
    inputs: list[str] = field(default_factory=list)  # the uncurated pool
    eval_sets: dict[str, list[str]] = field(default_factory=dict)  # name → patterns (decontamination)
    query_sets: dict[str, QuerySetConfig] = field(default_factory=dict)  # name → curated query set
    embedders: dict[str, EmbedderConfig] = field(default_factory=dict)
    embed: EmbedStageConfig = field(default_factory=EmbedStageConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    calibrate: CalibrateConfig = field(default_factory=CalibrateConfig)  # thresholds left null
    write: WriteConfig = field(default_factory=WriteConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)  # gathered job or job arrays (same results)
    seed: int = 0  # order of the written images (write.shuffle)

    def retrieve_config(self) -> RetrieveConfig:
        """The retrieve stage's config with the per-set options of ``query_sets`` filled in."""
        sets = [RetrieveQuerySetConfig(name=name, method=qs.method, k=qs.k, max_per_set=qs.max_per_set)
                for name, qs in sorted(self.query_sets.items())]
        return dataclasses.replace(self.retrieve, query_sets=sets)

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("key 'output_dir': required (the folder every stage writes into)")
        if not self.inputs:
            raise ConfigError("key 'inputs': required (patterns of the pool's tar shards / folders / parquet lists)")
        if not self.embedders:
            raise ConfigError("key 'embedders': at least one embedder is required")
        for kind, names in (("embedders", self.embedders), ("eval_sets", self.eval_sets),
                            ("query_sets", self.query_sets)):
            for name in names:
                if not _NAME.match(name):
                    raise ConfigError(f"key '{kind}.{name}': names may use letters, digits, '_' and '-' only")
        for name, patterns in self.eval_sets.items():
            if not patterns:
                raise ConfigError(f"key 'eval_sets.{name}': no input patterns")
        for name, qs in self.query_sets.items():
            if not qs.inputs:
                raise ConfigError(f"key 'query_sets.{name}.inputs': no input patterns")
            qs.method = coerce(RetrieveMethod, qs.method, f"query_sets.{name}.method")
            if qs.k < 0 or qs.max_per_set < 0:
                raise ConfigError(f"key 'query_sets.{name}': k and max_per_set must be >= 0 (0 = retrieve default)")
        if self.retrieve.query_sets:
            raise ConfigError("key 'retrieve.query_sets': give per-set options under query_sets.<name> instead")
        for name, emb in self.embedders.items():
            _sub_validate(emb, f"embedders.{name}")
        for stage in ("dedup", "decontaminate", "retrieve"):
            ref = getattr(getattr(self, stage), "embedder", "")
            if ref and ref not in self.embedders:
                raise ConfigError(
                    f"key '{stage}.embedder': '{ref}' is not among the configured embedders "
                    f"({', '.join(sorted(self.embedders))})"
                )
            if not ref and len(self.embedders) > 1:
                raise ConfigError(f"key '{stage}.embedder': required when several embedders are configured")
        if self.embed.max_pixels < 1 or self.embed.max_bytes < 1 or self.embed.num_workers < 0:
            raise ConfigError("key 'embed': max_pixels and max_bytes must be >= 1, num_workers >= 0")
        for stage in ("dedup", "decontaminate", "calibrate", "write", "executor", "sharding"):
            _sub_validate(getattr(self, stage), stage)
        _sub_validate(self.retrieve_config(), "retrieve")
        for stage in ("dedup", "decontaminate"):
            if getattr(self, stage).verify.enabled and self.sharding.mode == "sharded":
                raise ConfigError(f"key '{stage}.verify.enabled': geometric verification runs in the gathered "
                                  f"{stage} only; set sharding.mode to gathered or auto, or {stage}.verify.enabled=false")


def _sub_validate(obj, prefix: str) -> None:
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except (ConfigError, ValueError, RuntimeError) as exc:  # stage modules raise their own error types
        msg = str(exc)
        raise ConfigError(msg if prefix in msg else f"key '{prefix}': {msg}") from None




def load_curation_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CurationConfig:
    """Typed, validated curation config (named maps such as ``embedders`` accept new names)."""
    return load_config(CurationConfig, path, overrides)
