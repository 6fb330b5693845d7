"""DINOv2 multi-crop augmentation, seeded per sample and fast on one CPU thread.

Two global crops and ``local_crops_number`` local crops, each: random-resized crop (bicubic),
horizontal flip, colour jitter (random order of brightness/contrast/saturation/hue), random
grayscale, Gaussian blur, solarize (second global crop only), ImageNet normalisation.

Blur probabilities are the *intended* ones (1.0 / 0.1 / 0.5 for global 1 / global 2 / locals).
The reference code wraps blur in a ``RandomApply`` subclass that applies it with ``1 - p``
(:mod:`dinov2.data.augment_reference`); this module samples ``blur = u < p`` and the tests
count it.  Set ``blur_p_*`` to 0.0 / 0.9 / 0.5 to reproduce the reference's behaviour.

Randomness: all parameters are drawn up front from a ``numpy.random.Generator`` the caller seeds
per sample (:meth:`DataAugmentationDINO.sample_params`) with the reference's distributions, then
applied deterministically — so a resumed run reproduces every crop exactly and no global RNG is
touched.  The tests compare these draws with the reference transforms' own draws.

Where the work goes: decode once (JPEG DCT-domain downscaling via ``draft`` when the image is much
larger than needed), crop+resize in one PIL call, photometric ops on the small crops through the
cheaper kernels of :mod:`dinov2.data.colour`, uint8 crops that the collate normalises once per
batch — or, with ``colour_ops_on: cuda``, flip and colour on the GPU
(:mod:`dinov2.data.augment_device`) so the CPU only decodes and crops.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from enum import Enum

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from dinov2.data import colour
from dinov2.data.decode import DEFAULT_MAX_PIXELS, decode_image
from dinov2.utils.config import ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


class ColourOpsOn(str, Enum):
    """Where flip + colour jitter + grayscale + blur + solarize + normalisation run."""

    cpu = "cpu"  # in the loader workers
    cuda = "cuda"  # on the training GPU when CUDA is available (the CPU only decodes and crops)


@dataclass
class CropsConfig:
    global_crops_size: int = 224
    global_crops_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_size: int = 98  # 96 in the /16 reference; 98 = 7 patches of 14
    local_crops_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])
    interpolation: str = "bicubic"
    ratio: list[float] = field(default_factory=lambda: [3.0 / 4.0, 4.0 / 3.0])  # crop aspect range
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p_global2: float = 0.2
    solarize_threshold: int = 128
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    draft_decode: bool = True  # let JPEG decode at 1/2, 1/4, 1/8 scale when that loses nothing
    colour_ops_on: ColourOpsOn = ColourOpsOn.cpu  # cuda: falls back to cpu when CUDA is absent

    def validate(self) -> None:
        def pair(name: str, lo_bound: float, hi_bound: float) -> None:
            v = getattr(self, name)
            if len(v) != 2 or not (lo_bound <= v[0] <= v[1] <= hi_bound) or v[1] <= 0:
                raise ConfigError(f"crops.{name} must be [min, max] with {lo_bound} <= min <= max <= {hi_bound}")

        if self.global_crops_size <= 0 or self.local_crops_size <= 0:
            raise ConfigError("crops.global_crops_size and crops.local_crops_size must be positive")
        if self.local_crops_number < 0:
            raise ConfigError("crops.local_crops_number must be >= 0")
        pair("global_crops_scale", 0.0, 1.0)
        pair("local_crops_scale", 0.0, 1.0)
        pair("ratio", 0.0, math.inf)
        pair("blur_sigma", 0.0, math.inf)
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p_global1", "blur_p_global2",
                     "blur_p_local", "solarize_p_global2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"crops.{name} must be a probability in [0, 1]")
        if not (self.brightness >= 0 and self.contrast >= 0 and self.saturation >= 0 and 0 <= self.hue <= 0.5):
            raise ConfigError("crops colour jitter strengths must be >= 0 (hue <= 0.5)")
        if not isinstance(self.colour_ops_on, ColourOpsOn):
            try:
                self.colour_ops_on = ColourOpsOn(self.colour_ops_on)
            except ValueError:
                raise ConfigError(f"crops.colour_ops_on must be one of {[m.value for m in ColourOpsOn]}") from None
        if self.interpolation not in _RESAMPLE:
            raise ConfigError(f"crops.interpolation must be one of {sorted(_RESAMPLE)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("crops.mean/std must have 3 entries, std > 0")


@dataclass
class CropParams:
    """Every random choice for one crop (so tests can count them and resume can replay them)."""

    kind: str  # "global1" | "global2" | "local"
    box: tuple[int, int, int, int]  # left, top, width, height in the decoded image
    size: int
    flip: bool
    jitter: bool
    jitter_order: tuple[int, ...]  # 0 brightness, 1 contrast, 2 saturation, 3 hue
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur: bool
    sigma: float
    solarize: bool


def _resized_crop_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """Random area fraction in ``scale`` and aspect in ``ratio`` (log-uniform); 10 tries, then centre."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    # Fallback: the largest centred crop whose aspect lies in ``ratio``.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def decode_for_crops(data: bytes, min_area: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                     draft: bool = True) -> Image.Image:
    """Decode to RGB; large JPEGs are decoded at a reduced scale that keeps >= ``min_area`` pixels.

    Any failure (and every non-JPEG) goes through :func:`decode_image`, which raises
    ``DecodeError(reason)`` with the shared reason codes.
    """
    if draft and data[:3] == b"\xff\xd8\xff":
        try:
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h <= max_pixels:
                scale = 1
                for s in (8, 4, 2):
                    if math.ceil(w / s) * math.ceil(h / s) >= min_area:
                        scale = s
                        break
                if scale > 1:
                    img.draft("RGB", (math.ceil(w / scale), math.ceil(h / scale)))
                    img.load()
                    ImageOps.exif_transpose(img, in_place=True)  # the default returns a full copy
                    return img if img.mode == "RGB" else img.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - the full decoder below classifies the failure
            log.debug("draft decode failed (%s); falling back to the full decoder", exc)
    return decode_image(data, max_pixels).image


class DataAugmentationDINO:
    """Multi-crop augmentation: ``{"global_crops": [t, t], "local_crops": [t] * n}`` (float32 CHW)."""

    def __init__(
        self,
        global_crops_scale=(0.32, 1.0),
        local_crops_scale=(0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 98,
        config: CropsConfig | None = None,
    ):
        cfg = config or CropsConfig()
        if config is None:
            cfg.global_crops_scale = list(global_crops_scale)
            cfg.local_crops_scale = list(local_crops_scale)
            cfg.local_crops_number = local_crops_number
            cfg.global_crops_size = global_crops_size
            cfg.local_crops_size = local_crops_size
        cfg.validate()
        self.cfg = cfg
        self.resample = _RESAMPLE[cfg.interpolation]

    @classmethod
    def from_config(cls, cfg: CropsConfig) -> DataAugmentationDINO:
        return cls(config=cfg)

    @property
    def min_decode_area(self) -> int:
        """Pixels the decoded image needs so the smallest global crop is never upsampled."""
        c = self.cfg
        return math.ceil(c.global_crops_size**2 / (c.global_crops_scale[0] * min(c.ratio[0], 1 / c.ratio[1])))

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        return decode_for_crops(data, self.min_decode_area, max_pixels, self.cfg.draft_decode)

    # ---- parameters -------------------------------------------------------------------------
    def _crop_params(self, rng: np.random.Generator, kind: str, width: int, height: int) -> CropParams:
        c = self.cfg
        is_global = kind != "local"
        scale = c.global_crops_scale if is_global else c.local_crops_scale
        size = c.global_crops_size if is_global else c.local_crops_size
        box = _resized_crop_box(rng, width, height, scale, c.ratio)
        flip = bool(rng.random() < c.flip_p)
        jitter = bool(rng.random() < c.color_jitter_p)
        order = tuple(int(i) for i in rng.permutation(4))
        brightness = float(rng.uniform(max(0.0, 1 - c.brightness), 1 + c.brightness))
        contrast = float(rng.uniform(max(0.0, 1 - c.contrast), 1 + c.contrast))
        saturation = float(rng.uniform(max(0.0, 1 - c.saturation), 1 + c.saturation))
        hue = float(rng.uniform(-c.hue, c.hue))
        grayscale = bool(rng.random() < c.grayscale_p)
        blur_p = {"global1": c.blur_p_global1, "global2": c.blur_p_global2, "local": c.blur_p_local}[kind]
        blur = bool(rng.random() < blur_p)
        sigma = float(rng.uniform(c.blur_sigma[0], c.blur_sigma[1]))
        solarize = bool(kind == "global2" and rng.random() < c.solarize_p_global2)
        return CropParams(kind, box, size, flip, jitter, order, brightness, contrast, saturation, hue,
                          grayscale, blur, sigma, solarize)

    def sample_params(self, rng: np.random.Generator, width: int, height: int) -> list[CropParams]:
        """All random choices for one image: [global1, global2, local × n]."""
        kinds = ["global1", "global2"] + ["local"] * self.cfg.local_crops_number
        return [self._crop_params(rng, k, width, height) for k in kinds]

    # ---- application ------------------------------------------------------------------------
    # The stages are separate methods so that bench/augment.py can time each one.
    def crop_resize(self, img: Image.Image, p: CropParams) -> Image.Image:
        left, top, w, h = p.box
        return img.resize((p.size, p.size), self.resample, box=(left, top, left + w, top + h))

    def photometric(self, crop: Image.Image, p: CropParams) -> np.ndarray:
        """Flip, colour jitter, grayscale, blur, solarize (the reference's order) on one crop."""
        a = np.asarray(crop)
        if p.flip:
            a = cv2.flip(a, 1)
        if p.jitter:
            a = colour.color_jitter(a, p.jitter_order, p.brightness, p.contrast, p.saturation, p.hue)
        if p.grayscale:
            a = colour.grayscale(a)
        if p.blur:
            a = colour.gaussian_blur(a, p.sigma)
        if p.solarize:
            a = colour.solarize(a, self.cfg.solarize_threshold)
        return a

    @staticmethod
    def to_uint8(crop) -> torch.Tensor:
        """uint8 CHW view of the crop's pixels (HWC underneath; a single channel is broadcast to 3)."""
        arr = np.asarray(crop)
        if not arr.flags.writeable:  # PIL's array view is read-only; torch wants a writable buffer
            arr = arr.copy()
        t = torch.from_numpy(arr)
        if t.ndim == 2:
            return t.unsqueeze(0).expand(3, -1, -1)
        return t.permute(2, 0, 1)

    def normalize(self, crops, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """uint8 crop(s) (3, H, W) → ImageNet-normalised ``dtype``, one fused pass (once per batch)."""
        if isinstance(crops, torch.Tensor) and crops.ndim == 3:
            return normalize_uint8([crops], self.cfg.mean, self.cfg.std, dtype)[0]
        return normalize_uint8(crops, self.cfg.mean, self.cfg.std, dtype)

    def apply_crop(self, img: Image.Image, p: CropParams) -> torch.Tensor:
        return self.normalize(self.to_uint8(self.photometric(self.crop_resize(img, p), p)))

    def crops_uint8(self, image: Image.Image, rng: np.random.Generator, photometric: bool = True) -> dict:
        """uint8 crops, normalised later once per batch; ``photometric=False`` leaves flip and colour
        to the device (:mod:`dinov2.data.augment_device`), so the CPU only decodes and crops."""
        image = _as_rgb(image)
        params = self.sample_params(rng, image.width, image.height)
        crops = []
        for p in params:
            crop = self.crop_resize(image, p)
            crops.append(self.to_uint8(self.photometric(crop, p) if photometric else crop))
        return {"global_crops": crops[:2], "local_crops": crops[2:], "params": params,
                "photometric_done": photometric}

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> dict:
        """Normalised float32 crops (per image; the loader uses :meth:`crops_uint8` instead)."""
        rng = rng if rng is not None else np.random.default_rng()
        out = self.crops_uint8(image, rng)
        for key in ("global_crops", "local_crops"):
            out[key] = [self.normalize(t) for t in out[key]]
        return out


def normalize_uint8(crops, mean, std, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack uint8 (3, H, W) crops and normalise: ``(x / 255 - mean) / std`` as one addcmul.

    The crops from :meth:`DataAugmentationDINO.to_uint8` are channel-last underneath, so stacking
    their channel-last views is a plain copy and the addcmul reads them strided once.
    """
    hwc = torch.stack([c.permute(1, 2, 0) for c in crops])
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
    out = torch.empty(hwc.shape[0], 3, hwc.shape[1], hwc.shape[2], dtype=torch.float32)
    torch.addcmul(-m * 255.0 * scale, hwc.permute(0, 3, 1, 2), scale, out=out)
    return out if dtype == torch.float32 else out.to(dtype)


def _as_rgb(image) -> Image.Image:
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image if image.mode == "RGB" else image.convert("RGB")


_hue_shift = colour.hue_shift  # kept for callers of the earlier private name
