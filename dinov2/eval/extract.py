"""CLS and patch features of an image folder or tar shards, written to ``.npy`` or Parquet.

The images go through the eval preprocessing (:class:`~dinov2.eval.features.EvalTransform`:
shorter side → ``resize_size`` bicubic, centre crop, ImageNet normalisation), so features match
``dinov2 eval``.  Output folder:

* ``npy``: ``cls.npy`` ``[N, D]``, ``patch.npy`` ``[N, h, w, D]`` (``h = w = crop / patch``),
  ``registers.npy`` ``[N, R, D]`` for register models; row ``i`` is image ``i`` of ``index.json``,
  rows of images that could not be decoded are NaN (``ok: false`` in the index);
* ``parquet``: ``features.parquet`` with ``path``, ``member``, ``label``, ``cls`` and ``patch``
  (flattened ``h * w * D``) per decodable image, one row group per batch;
* ``index.json`` (written last): the images in order, the grid, the settings.

Arrays are written to memory-mapped temporary files and renamed at the end, so a large set never
has to fit in memory and an interrupted run leaves no partial outputs.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dinov2.eval.features import (
    EvalTransform,
    EvalTransformConfig,
    LabeledImageDataset,
    _collate,
    list_images,
)
from dinov2.utils.io import atomic_path, atomic_write_json


class OutputFormat(str, Enum):
    NPY = "npy"
    PARQUET = "parquet"


@dataclass
class ExtractConfig:
    resize_size: int = 256
    crop_size: int = 224
    batch_size: int = 32
    num_workers: int = 0
    patch: bool = True  # also write patch tokens (CLS only when False)
    format: OutputFormat = OutputFormat.NPY


@dataclass
class ExtractResult:
    out_dir: Path
    images: int
    written: int
    bad: Counter
    dim: int
    grid: tuple[int, int]


class _NpyWriter:
    def __init__(self, stack: contextlib.ExitStack, out: Path, n: int, shapes: dict[str, tuple[int, ...]]):
        self.arrays = {}
        for name, shape in shapes.items():
            tmp = stack.enter_context(atomic_path(out / f"{name}.npy"))
            array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *shape))
            array[:] = np.nan  # rows of undecodable images stay NaN
            self.arrays[name] = array

    def write(self, rows: np.ndarray, outputs: dict[str, np.ndarray], items) -> None:
        for name, array in self.arrays.items():
            array[rows] = outputs[name]

    def close(self) -> None:
        for array in self.arrays.values():
            array.flush()
        self.arrays.clear()


class _ParquetWriter:
    def __init__(self, stack: contextlib.ExitStack, out: Path, shapes: dict[str, tuple[int, ...]]):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.pa = pa
        self.sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
        fields = [pa.field("path", pa.string()), pa.field("member", pa.string()), pa.field("label", pa.int64())]
        fields += [pa.field(name, pa.list_(pa.float32(), size)) for name, size in self.sizes.items()]
        self.schema = pa.schema(fields)
        tmp = stack.enter_context(atomic_path(out / "features.parquet"))
        self.writer = pq.ParquetWriter(tmp, self.schema)

    def write(self, rows: np.ndarray, outputs: dict[str, np.ndarray], items) -> None:
        pa = self.pa
        columns = [
            pa.array([it.path for it in items], pa.string()),
            pa.array([it.member for it in items], pa.string()),
            pa.array([it.label for it in items], pa.int64()),
        ]
        for name, size in self.sizes.items():
            flat = np.ascontiguousarray(outputs[name].reshape(len(items), size), dtype=np.float32)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), size))
        self.writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@torch.no_grad()
def extract_to_folder(
    model: torch.nn.Module,
    source: str | Path,
    out_dir: str | Path,
    cfg: ExtractConfig | None = None,
    device: torch.device | str = "cpu",
    weights: str = "",
) -> ExtractResult:
    """Write the features of every image under ``source`` to ``out_dir`` (see the module doc)."""
    cfg = cfg or ExtractConfig()
    fmt = OutputFormat(cfg.format)
    device = torch.device(device)
    patch_size = int(model.patch_size)
    if cfg.crop_size % patch_size:
        raise ValueError(f"crop size {cfg.crop_size} is not a multiple of the patch size {patch_size}")
    listing = list_images(source)
    items = listing.items
    grid = (cfg.crop_size // patch_size, cfg.crop_size // patch_size)
    dim = int(model.embed_dim)
    registers = int(getattr(model, "num_register_tokens", 0))
    shapes: dict[str, tuple[int, ...]] = {"cls": (dim,)}
    if cfg.patch:
        shapes["patch"] = (*grid, dim)
    if registers:
        shapes["registers"] = (registers, dim)
    transform = EvalTransform(EvalTransformConfig(resize_size=cfg.resize_size, crop_size=cfg.crop_size))
    loader = DataLoader(
        LabeledImageDataset(items, transform), batch_size=cfg.batch_size, shuffle=False,
        num_workers=cfg.num_workers, collate_fn=_collate, pin_memory=device.type == "cuda",
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ok = np.zeros(len(items), dtype=bool)
    bad: Counter = Counter(listing.skipped)
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            writer = (_NpyWriter(stack, out_dir, len(items), shapes) if fmt is OutputFormat.NPY
                      else _ParquetWriter(stack, out_dir, shapes))
            stack.callback(writer.close)  # runs before the renames (callbacks unwind in reverse)
            for x, _, idx, reasons in loader:
                bad.update(reasons)
                if x is None:
                    continue
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    feats = model.forward_features(x.to(device, non_blocking=True))
                outputs = {"cls": feats["x_norm_clstoken"].float().cpu().numpy()}
                if cfg.patch:
                    outputs["patch"] = feats["x_norm_patchtokens"].float().cpu().numpy().reshape(-1, *grid, dim)
                if registers:
                    outputs["registers"] = feats["x_norm_regtokens"].float().cpu().numpy()
                rows = idx.numpy()
                writer.write(rows, outputs, [items[i] for i in rows])
                ok[rows] = True
            if not ok.any():
                raise ValueError(f"no decodable images among {len(items)} (failures: {dict(bad)})")
    finally:
        model.train(was_training)
    atomic_write_json(out_dir / "index.json", {
        "format": fmt.value,
        "weights": weights,
        "resize_size": cfg.resize_size,
        "crop_size": cfg.crop_size,
        "patch_size": patch_size,
        "grid": list(grid),
        "dim": dim,
        "num_register_tokens": registers,
        "arrays": {name: [int(ok.sum()) if fmt is OutputFormat.PARQUET else len(items), *shape]
                   for name, shape in shapes.items()},
        "bad": dict(bad),
        "images": [{"path": it.path, "member": it.member, "label": it.label, "ok": bool(good)}
                   for it, good in zip(items, ok)],
    })
    return ExtractResult(out_dir, len(items), int(ok.sum()), bad, dim, grid)
