"""The closed choices of the curation configs, as enums the config layer checks once.

Values are the strings users write in YAML; members compare equal to those strings, so stage code
reads ``cfg.kind == "dinov2"`` either way.  :func:`coerce` turns a plain string (a config built in
Python rather than loaded) into its member with the same one-line error as a bad YAML value.
"""
from __future__ import annotations

from enum import Enum
from typing import TypeVar

E = TypeVar("E", bound="Choice")


class Choice(str, Enum):
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


def coerce(enum: type[E], value: str | E, key: str) -> E:
    from dinov2.utils.config import ConfigError

    try:
        return enum(value)
    except ValueError:
        name = key.rsplit(".", 1)[-1]
        raise ConfigError(f"key '{key}': {name} {value!r} is not one of {list(enum.values())}") from None


class EmbedderKind(Choice):
    dinov2 = "dinov2"
    torchscript = "torchscript"
    efficientnet_lite0 = "efficientnet_lite0"


class Descriptor(Choice):
    whole = "global"  # ("global" is a Python keyword)
    flip = "flip"
    regions = "regions"


class Pooling(Choice):
    cls = "cls"
    cls_avgpool = "cls_avgpool"


class Device(Choice):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class DType(Choice):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class IndexKind(Choice):
    auto = "auto"
    flat = "flat"
    ivf = "ivf"
    ivfpq = "ivfpq"
    ivf_gemm = "ivf_gemm"


class Quantizer(Choice):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"


class UseGpu(Choice):
    auto = "auto"
    never = "never"
    always = "always"


class RetrieveMethod(Choice):
    auto = "auto"
    sample = "sample"
    cluster = "cluster"
    none = "none"


class Cluster(Choice):
    local = "local"
    slurm = "slurm"
    debug = "debug"


class Sharding(Choice):
    auto = "auto"  # sharded once the pool reaches sharding.min_items
    gathered = "gathered"
    sharded = "sharded"


class Whitening(Choice):
    none = "none"
    pca = "pca"  # PCA whitening fitted on a sample of the pool, eigenvalues shrunk (curation/whiten.py)
