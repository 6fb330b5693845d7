"""Weighted k-NN classification on frozen features (DINO protocol).

Cosine similarity between L2-normalised features; each of the k nearest training samples votes
for its class with weight exp(sim / T); k ∈ {10, 20, 100, 200}, T = 0.07 by default; k is capped
at the training-set size.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Predicted class scores per k: {k: [N_test, C]} (k capped at the train size)."""
    if train_features.ndim != 2 or test_features.ndim != 2:
        raise ValueError("features must be [N, D] matrices")
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError("train features and labels differ in length")
    if train_features.shape[0] == 0:
        raise ValueError("empty training set")
    if test_features.shape[0] == 0:
        raise ValueError("empty evaluation set")
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"k-NN needs every k >= 1, got {list(ks)}")
    if temperature <= 0:
        raise ValueError(f"k-NN temperature must be > 0, got {temperature}")
    n_train = train_features.shape[0]
    C = int(num_classes if num_classes is not None else int(train_labels.max()) + 1)
    caps = sorted({min(int(k), n_train) for k in ks})
    kmax = caps[-1]
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    out = {k: [] for k in caps}
    for start in range(0, test_features.shape[0], chunk_size):
        q = F.normalize(test_features[start : start + chunk_size].float(), dim=1)
        sim, idx = (q @ train.T).topk(kmax, dim=1)  # sorted descending
        weights = (sim / temperature).exp()
        onehot = F.one_hot(labels[idx], C).float()  # [q, kmax, C]
        for k in caps:
            out[k].append((onehot[:, :k] * weights[:, :k, None]).sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
) -> dict[str, float]:
    """{"knn_top1_k20": 0.83, ..., "knn_top5_k20": ...}; top-5 only with ≥ 5 classes."""
    if train_labels.numel() == 0 or test_labels.numel() == 0:
        raise ValueError("empty training set" if train_labels.numel() == 0 else "empty evaluation set")
    C = int(max(int(train_labels.max()), int(test_labels.max())) + 1)
    scores = knn_classify(train_features, train_labels, test_features, ks, temperature, num_classes=C)
    res: dict[str, float] = {}
    y = test_labels.long()
    for k, s in scores.items():
        res[f"knn_top1_k{k}"] = float((s.argmax(1) == y).float().mean())
        if C >= 5:
            top5 = s.topk(5, dim=1).indices
            res[f"knn_top5_k{k}"] = float((top5 == y[:, None]).any(1).float().mean())
    return res
