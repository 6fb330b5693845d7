"""k-NN / linear evaluation of a backbone on a labeled train/val pair (used by the trainer and CLI)."""
from __future__ import annotations

import logging
from typing import Any

import torch

from dinov2.eval.features import EvalTransformConfig, extract_features, list_labeled
from dinov2.eval.knn import knn_accuracy
from dinov2.eval.linear import LinearProbeConfig, linear_probe

log = logging.getLogger("dinov2.eval")


def evaluate_backbone(backbone: torch.nn.Module, eval_cfg: Any, device: torch.device | str = "cpu",
                      cache: dict | None = None, linear_cfg: LinearProbeConfig | None = None) -> dict[str, float]:
    """``eval_cfg`` needs: train_dir, val_dir, resize_size, crop_size, batch_size, num_workers, ks,
    temperature, linear.  ``cache`` keeps the file listings between calls."""
    cache = cache if cache is not None else {}
    sets = cache.get("sets")
    if sets is None:
        sets = cache["sets"] = (list_labeled(eval_cfg.train_dir), list_labeled(eval_cfg.val_dir))
    train_set, val_set = sets
    tcfg = EvalTransformConfig(resize_size=eval_cfg.resize_size, crop_size=eval_cfg.crop_size)
    common = dict(transform_cfg=tcfg, batch_size=eval_cfg.batch_size, num_workers=eval_cfg.num_workers, device=device)
    tr = extract_features(backbone, train_set.items, **common)
    va = extract_features(backbone, val_set.items, **common)
    res = knn_accuracy(tr.features, tr.labels, va.features, va.labels, ks=list(eval_cfg.ks),
                       temperature=eval_cfg.temperature)
    if getattr(eval_cfg, "linear", False):
        res.update(linear_probe(tr.features, tr.labels, va.features, va.labels, linear_cfg))
    res["n_train"] = float(tr.features.shape[0])
    res["n_val"] = float(va.features.shape[0])
    bad = sum(tr.bad.values()) + sum(va.bad.values())
    if bad:
        res["bad_images"] = float(bad)
        log.warning("eval: %d undecodable images skipped (%s / %s)", bad, dict(tr.bad), dict(va.bad))
    return res
