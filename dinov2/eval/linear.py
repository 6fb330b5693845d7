"""Linear probe on frozen features: a linear layer (multinomial logistic regression) trained with
SGD (momentum 0.9, cosine LR) for each LR of a small grid.  The LR is chosen on a held-out 10 %
of the training features (not on the evaluation set), then the probe is retrained on all training
features with that LR and scored on the evaluation set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class LinearProbeConfig:
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0])
    epochs: int = 100
    batch_size: int = 256
    weight_decay: float = 0.0
    holdout_fraction: float = 0.1
    seed: int = 0


def _standardize(train: torch.Tensor, *others: torch.Tensor):
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def train_linear(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, lr: float, cfg: LinearProbeConfig
) -> torch.nn.Linear:
    g = torch.Generator().manual_seed(cfg.seed)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    n = x.shape[0]
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    total = cfg.epochs * steps_per_epoch
    step = 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            b = perm[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            for grp in opt.param_groups:
                grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(layer(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return layer


@torch.no_grad()
def _accuracy(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((layer(x).argmax(1) == y).float().mean())


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    cfg: LinearProbeConfig | None = None,
) -> dict[str, float]:
    """{"linear_top1": acc on the test set, "linear_best_lr": lr, "linear_holdout_top1": ...}."""
    cfg = cfg or LinearProbeConfig()
    if not cfg.lrs:
        raise ValueError("linear probe needs at least one learning rate")
    xtr, xte = _standardize(train_features.float(), test_features.float())
    ytr, yte = train_labels.long(), test_labels.long()
    C = int(max(int(ytr.max()), int(yte.max())) + 1)
    n = xtr.shape[0]
    n_hold = int(round(n * cfg.holdout_fraction))
    if n_hold >= 1 and n - n_hold >= 1 and len(cfg.lrs) > 1:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))
        hold, fit = perm[:n_hold], perm[n_hold:]
        scores = {lr: _accuracy(train_linear(xtr[fit], ytr[fit], C, lr, cfg), xtr[hold], ytr[hold]) for lr in cfg.lrs}
        best_lr = max(cfg.lrs, key=lambda lr: (scores[lr], -lr))  # ties → smaller LR
        hold_acc = scores[best_lr]
    else:
        best_lr, hold_acc = cfg.lrs[0], float("nan")
    layer = train_linear(xtr, ytr, C, best_lr, cfg)
    return {"linear_top1": _accuracy(layer, xte, yte), "linear_best_lr": best_lr, "linear_holdout_top1": hold_acc}
