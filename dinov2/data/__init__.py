"""Training data: tar shards → decoded images → multi-crop augmentation → masked, collated batches.

Heavy modules (torch, torchvision) are imported lazily so ``dinov2.data.decode`` stays light for
the curation pipeline.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "CropsConfig": "dinov2.data.augment",
    "DataAugmentationDINO": "dinov2.data.augment",
    "MaskingGenerator": "dinov2.data.masking",
    "collate_data_and_cast": "dinov2.data.collate",
    "DataConfig": "dinov2.data.loader",
    "SourceConfig": "dinov2.data.loader",
    "TrainLoader": "dinov2.data.loader",
    "build_train_loader": "dinov2.data.loader",
    "DataError": "dinov2.data.webdataset",
    "SampleStream": "dinov2.data.webdataset",
    "iter_tar_samples": "dinov2.data.webdataset",
    "scan_shard": "dinov2.data.webdataset",
    "expand_braces": "dinov2.data.shards",
    "split_key": "dinov2.data.shards",
    "write_shard": "dinov2.data.shards",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dinov2.data' has no attribute {name!r}")
