"""The public reference DINOv2 multi-crop augmentation, restated with the same torchvision v1 transforms.

Not on the training path: it is the baseline that ``bench/augment.py`` times and the oracle whose
random draws the distribution tests compare :mod:`dinov2.data.augment` against.  Faithful to the
reference's ``DataAugmentationDINO`` (and its ``ImageDataDecoder``):

- decode: ``Image.open(...).convert("RGB")`` at full size;
- per crop: ``RandomResizedCrop`` (bicubic) then ``RandomHorizontalFlip(0.5)``; then
  ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)``, ``RandomGrayscale(0.2)``; then the
  per-crop extra; then ``ToTensor`` + ``Normalize`` (ImageNet mean/std);
- extras: global 1 blur, global 2 blur + ``RandomSolarize(128, p=0.2)``, local blur; the blur is
  ``GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))`` inside a ``RandomApply`` whose probability the
  reference sets to ``1 - p`` for p = 1.0 / 0.1 / 0.5 — so it blurs global crop 1 never, global
  crop 2 with probability 0.9 and local crops with 0.5 (``REFERENCE_BLUR_P``).
"""
from __future__ import annotations

import io

from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: The intended blur probabilities (global 1, global 2, local) and what the reference code applies.
INTENDED_BLUR_P = (1.0, 0.1, 0.5)
REFERENCE_BLUR_P = tuple(1.0 - p for p in INTENDED_BLUR_P)
BLUR_KERNEL_SIZE = 9


def reference_decode(data: bytes) -> Image.Image:
    """The reference decoder: full-size PIL decode, converted to RGB."""
    return Image.open(io.BytesIO(data)).convert(mode="RGB")


def _blur(intended_p: float) -> T.RandomApply:
    # The reference's RandomApply subclass passes keep_p = 1 - p as the *apply* probability.
    return T.RandomApply([T.GaussianBlur(kernel_size=BLUR_KERNEL_SIZE, sigma=(0.1, 2.0))], p=1.0 - intended_p)


class ReferenceMultiCrop:
    """``{"global_crops": [t, t], "local_crops": [t] * n}``, float32 CHW, drawn from torch's global RNG."""

    def __init__(self, global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=8,
                 global_crops_size=224, local_crops_size=98):
        bicubic = T.InterpolationMode.BICUBIC
        self.local_crops_number = local_crops_number
        self.geometric_augmentation_global = T.Compose([
            T.RandomResizedCrop(global_crops_size, scale=global_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5),
        ])
        self.geometric_augmentation_local = T.Compose([
            T.RandomResizedCrop(local_crops_size, scale=local_crops_scale, interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5),
        ])
        color_jittering = T.Compose([
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
        ])
        normalize = T.Compose([T.ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
        g1, g2, loc = INTENDED_BLUR_P
        self.global_transfo1 = T.Compose([color_jittering, _blur(g1), normalize])
        self.global_transfo2 = T.Compose([color_jittering, T.Compose([_blur(g2), T.RandomSolarize(128, p=0.2)]),
                                          normalize])
        self.local_transfo = T.Compose([color_jittering, _blur(loc), normalize])

    def __call__(self, image: Image.Image) -> dict:
        g1 = self.global_transfo1(self.geometric_augmentation_global(image))
        g2 = self.global_transfo2(self.geometric_augmentation_global(image))
        local = [self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)]
        return {"global_crops": [g1, g2], "local_crops": local}
