"""Self-supervised losses and teacher centering (DINO, iBOT, KoLeo)."""
from dinov2.loss.centering import SoftmaxCenter, sinkhorn_knopp
from dinov2.loss.dino import DINOLoss, dino_pair_count
from dinov2.loss.ibot import iBOTPatchLoss, masked_patch_weights
from dinov2.loss.koleo import KoLeoLoss

__all__ = [
    "DINOLoss",
    "KoLeoLoss",
    "SoftmaxCenter",
    "dino_pair_count",
    "iBOTPatchLoss",
    "masked_patch_weights",
    "sinkhorn_knopp",
]
