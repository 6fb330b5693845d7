"""Frozen features of a labeled image set, for k-NN and linear evaluation.

A labeled set is either an image folder with one sub-folder per class (``root/<class>/*.jpg``,
classes sorted by name) or WebDataset tar shards where each sample has an image member and its
label in ``<key>.cls`` (an integer) or ``<key>.json`` (``"label"`` or ``"cls"``).  Sample keys are
member paths without their final extension, so dotted keys (``img.0001.jpg``) work.  Images that
cannot be decoded are skipped and counted by reason, never fatal.
"""
from __future__ import annotations

import glob
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinov2.data.decode import DecodeError, decode_image
from dinov2.data.shards import (
    RangeReader,
    ShardWriter,
    expand_braces,
    group_samples,
    is_image_ext,
    list_tar,
    read_range,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class EvalTransformConfig:
    resize_size: int = 256
    crop_size: int = 224
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))


class EvalTransform:
    """Shorter side → ``resize_size`` (bicubic), center crop ``crop_size``, normalise."""

    def __init__(self, cfg: EvalTransformConfig):
        if cfg.crop_size > cfg.resize_size:
            raise ValueError(f"crop_size {cfg.crop_size} > resize_size {cfg.resize_size}")
        self.cfg = cfg
        self.mean = torch.tensor(cfg.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        s = self.cfg.resize_size / min(w, h)
        nw, nh = max(self.cfg.resize_size, round(w * s)), max(self.cfg.resize_size, round(h * s))
        img = img.resize((nw, nh), Image.BICUBIC)
        c = self.cfg.crop_size
        left, top = (nw - c) // 2, (nh - c) // 2
        img = img.crop((left, top, left + c, top + c))
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std


@dataclass(frozen=True)
class Item:
    path: str  # image file, or tar file
    label: int
    offset: int = -1  # byte offset of the member's data in the tar (-1: plain file)
    size: int = -1
    member: str = ""  # name inside the tar ("" for plain files)


@dataclass
class LabeledSet:
    items: list[Item]
    classes: list[str]
    skipped: Counter = field(default_factory=Counter)  # listing-time problems by reason


def _label_from_sidecar(ext: str, data: bytes) -> int:
    text = data.decode("utf-8").strip()
    if ext == "cls":
        return int(text)
    obj = json.loads(text)
    for key in ("label", "cls"):
        if key in obj:
            return int(obj[key])
    raise ValueError("json sidecar has no 'label' or 'cls'")


def _shard_paths(source: str) -> list[str]:
    p = Path(source)
    if p.is_dir():
        shards = sorted(str(x) for x in p.glob("*.tar"))
    else:
        shards = sorted({s for pat in expand_braces(source) for s in (glob.glob(pat) or [pat])})
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"labeled set: shard(s) not found: {missing[:3]}")
    return shards


def list_labeled(source: str | Path) -> LabeledSet:
    """List an image folder with class sub-folders, or tar shards (a folder of .tar files, a file,
    a glob or a brace pattern)."""
    source = str(source)
    p = Path(source)
    if p.is_dir() and not any(p.glob("*.tar")):
        return _list_folder(p)
    return _list_shards(_shard_paths(source))


def list_images(source: str | Path) -> LabeledSet:
    """Like :func:`list_labeled` without needing labels: every image of a folder (recursively, in
    path order) or of tar shards; items carry their label when shards have one, else -1."""
    source = str(source)
    p = Path(source)
    if p.is_dir() and not any(p.glob("*.tar")):
        items = [Item(str(f), -1) for f in sorted(p.rglob("*")) if f.is_file() and is_image_ext(f.suffix.lstrip("."))]
        if not items:
            raise ValueError(f"{p}: no images found")
        return LabeledSet(items, [])
    return _list_shards(_shard_paths(source), require_labels=False)


def _list_folder(root: Path) -> LabeledSet:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).rglob("*")):
            if f.is_file() and is_image_ext(f.suffix.lstrip(".")):
                items.append(Item(str(f), label))
    if not items:
        raise ValueError(f"{root}: no images found in the class folders")
    return LabeledSet(items, classes)


def _list_shards(shards: Sequence[str], require_labels: bool = True) -> LabeledSet:
    items: list[Item] = []
    skipped: Counter = Counter()
    for shard in shards:
        try:
            listing = list_tar(shard)
        except OSError:
            skipped["shard_unreadable"] += 1
            continue
        if listing.damage is not None:
            skipped[listing.damage.reason] += 1  # keep what was listed before the damage
        with RangeReader(max_open=1) as reader:
            for sample in group_samples(listing.members):
                image = sample.image()
                side = next((e for e in ("cls", "json") if e in sample.members), None)
                if image is None:
                    continue
                label = -1
                if side is not None:
                    m = sample.members[side]
                    try:
                        label = _label_from_sidecar(side, reader.read(shard, m.offset, m.size))
                    except (ValueError, UnicodeDecodeError, OSError):
                        skipped["bad_label"] += 1
                        continue
                elif require_labels:
                    skipped["no_label"] += 1
                    continue
                items.append(Item(shard, label, image[1].offset, image[1].size, image[1].name))
    if not items:
        hint = " (labels go in <key>.cls or <key>.json)" if require_labels else ""
        raise ValueError(f"no {'labeled ' if require_labels else ''}images in {len(shards)} shard(s){hint}")
    n_classes = max(i.label for i in items) + 1
    return LabeledSet(items, [str(i) for i in range(n_classes)], skipped)


class LabeledImageDataset(Dataset):
    def __init__(self, items: list[Item], transform, max_pixels: int = 178_956_970):
        self.items = items
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item = self.items[i]
        try:
            data = read_range(item.path, item.offset, item.size)
            img = decode_image(data, self.max_pixels).image
            return self.transform(img), item.label, i, ""
        except DecodeError as e:
            return None, item.label, i, e.reason
        except OSError:
            return None, item.label, i, "read_error"


def _collate(batch):
    ok = [b for b in batch if b[0] is not None]
    bad = [b[3] for b in batch if b[0] is None]
    if ok:
        x = torch.stack([b[0] for b in ok])
        y = torch.tensor([b[1] for b in ok])
        idx = torch.tensor([b[2] for b in ok])
    else:
        x, y, idx = None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return x, y, idx, bad


@dataclass
class Features:
    features: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N] int64
    indices: torch.Tensor  # [N] positions in the item list (bad images left out)
    bad: Counter


def _cls_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_features"):
        out = model.forward_features(x)
        if isinstance(out, dict):
            return out["x_norm_clstoken"]
    return model(x)


@torch.no_grad()
def extract_features(
    model: torch.nn.Module,
    items: list[Item],
    transform_cfg: EvalTransformConfig | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    feature_fn=None,
) -> Features:
    """CLS features (``x_norm_clstoken``) of every decodable item, in item order."""
    device = torch.device(device)
    transform = EvalTransform(transform_cfg or EvalTransformConfig())
    loader = DataLoader(
        LabeledImageDataset(items, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    fn = feature_fn or _cls_features
    feats, labels, idxs, bad = [], [], [], Counter()
    try:
        for x, y, idx, bad_reasons in loader:
            bad.update(bad_reasons)
            if x is None:
                continue
            x = x.to(device, non_blocking=True)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                f = fn(model, x)
            feats.append(f.float().cpu())
            labels.append(y)
            idxs.append(idx)
    finally:
        model.train(was_training)
    if not feats:
        raise ValueError(f"no decodable images among {len(items)} (failures: {dict(bad)})")
    return Features(torch.cat(feats), torch.cat(labels), torch.cat(idxs), bad)


def write_labeled_shards(items: Sequence[Item], out_dir: str | Path, per_shard: int = 1000,
                         prefix: str = "shard") -> list[str]:
    """Copy labeled images into WebDataset tar shards (``<key>.<ext>`` + ``<key>.cls``), original
    bytes unchanged, in item order; each shard is written atomically.  Returns the shard paths."""
    from dinov2.data.shards import written_image_ext

    out_dir = Path(out_dir)
    paths = []
    for s in range(0, len(items), per_shard):
        path = out_dir / f"{prefix}-{s // per_shard:06d}.tar"
        with ShardWriter(path) as tar:
            for i, item in enumerate(items[s : s + per_shard]):
                data = read_range(item.path, item.offset, item.size)
                key = f"{s + i:08d}"
                ext = written_image_ext(Path(item.path).suffix if item.offset < 0 else None, data)
                tar.add(f"{key}.{ext}", data)
                tar.add(f"{key}.cls", str(item.label).encode())
        paths.append(str(path))
    return paths
