"""The trainer's DataLoader: shards → decoded, multi-crop-augmented, masked, collated batches.

Positions are *rank-local sample indices*: batch ``j`` of a rank holds samples
``j*B .. (j+1)*B-1``.  Batch ``j`` is cut from stream ``j % streams_per_rank``; DataLoader worker
``w`` (of ``W``, ``W`` divides ``streams_per_rank``) produces batches ``j0 + w, j0 + w + W, …``,
which is exactly the order in which the DataLoader hands batches out (round robin over workers).
So the batch sequence is a pure function of ``(seed, rank, world_size, streams_per_rank)`` and the
position, and does not depend on ``num_workers``.

Resume: ``build_train_loader(cfg, rank, world_size, start_sample=N)`` with ``N`` = the
``next_sample`` of the last batch the trainer consumed (= iterations × batch size) yields the same
remaining batches as the uninterrupted run; streams fast-forward through tar headers only.

Bad images are skipped and counted: their slot in the batch is refilled with a fresh augmentation
of another good image of the same batch (seeded by the slot's own position), so a batch never
shrinks and positions never shift.  If every image of a batch is bad the batch is dropped (the
position still advances; counted as ``empty_batch``).
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dinov2.data.augment import ColourOpsOn, CropsConfig, DataAugmentationDINO
from dinov2.data.augment_device import augment_batch
from dinov2.data.collate import collate_data_and_cast, resolve_dtype
from dinov2.data.decode import DEFAULT_MAX_PIXELS, DecodeError
from dinov2.data.masking import MaskingGenerator
from dinov2.data.shards import RangeReader, ShortRead, expand_braces
from dinov2.data.webdataset import (
    TAG_AUGMENT,
    TAG_MASK,
    DataError,
    SampleStream,
    rng_for,
    stream_batches_before,
)
from dinov2.utils.config import ConfigError

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    pattern: str = MISSING  # e.g. /data/lvd/lvd-{000000..000127}.tar ("::" joins several patterns)
    weight: float = 1.0  # relative share of samples drawn from this source
    name: str = ""


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    batch_size: int = 64  # per rank
    num_workers: int = 8  # must divide streams_per_rank (0 = in the main process)
    streams_per_rank: int = 8  # fixed stream count: the sample order does not depend on num_workers
    shuffle_buffer: int = 1000  # per stream and source
    seed: int = 0
    crops: CropsConfig = field(default_factory=CropsConfig)
    patch_size: int = 14
    mask_ratio_min: float = 0.1
    mask_ratio_max: float = 0.5
    mask_sample_probability: float = 0.5
    mask_min_patches: int = 4
    mask_max_patches_fraction: float = 0.5  # of the patches of one global crop, per block
    mask_min_aspect: float = 0.3
    mask_max_aspect: float = 1.0 / 0.3
    max_pixels: int = DEFAULT_MAX_PIXELS
    dtype: str = "float32"  # dtype of the collated crops
    pin_memory: bool = True  # only takes effect when CUDA is available
    prefetch_factor: int = 2
    worker_threads: int = 1  # torch threads per worker (augmentation is single-threaded by design)
    max_consecutive_empty_batches: int = 50  # then fail clearly instead of spinning on broken data

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: give at least one {pattern, weight}")
        for i, s in enumerate(self.sources):
            if not s.pattern:
                raise ConfigError(f"data.sources[{i}].pattern is empty")
            if not s.weight > 0:
                raise ConfigError(f"data.sources[{i}].weight must be > 0, got {s.weight}")
        if self.batch_size <= 0:
            raise ConfigError("data.batch_size must be > 0")
        if self.streams_per_rank <= 0:
            raise ConfigError("data.streams_per_rank must be > 0")
        if self.num_workers < 0 or self.streams_per_rank % max(1, self.num_workers):
            raise ConfigError(
                f"data.num_workers ({self.num_workers}) must divide data.streams_per_rank "
                f"({self.streams_per_rank}) so the sample order does not depend on the worker count"
            )
        if self.shuffle_buffer < 1:
            raise ConfigError("data.shuffle_buffer must be >= 1")
        if not 0 <= self.mask_ratio_min <= self.mask_ratio_max <= 1:
            raise ConfigError("data.mask_ratio_min/max must satisfy 0 <= min <= max <= 1")
        if not 0 <= self.mask_sample_probability <= 1:
            raise ConfigError("data.mask_sample_probability must be in [0, 1]")
        if self.crops.global_crops_size % self.patch_size:
            raise ConfigError("data.crops.global_crops_size must be a multiple of data.patch_size")
        if not 0 < self.mask_min_aspect <= self.mask_max_aspect:
            raise ConfigError("data.mask_min_aspect/max_aspect must satisfy 0 < min <= max")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"data.dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        self.crops.validate()


def expand_sources(cfg: DataConfig) -> list[list[str]]:
    """Shard lists per source; a source whose shards are all missing is a configuration error."""
    out = []
    for i, s in enumerate(cfg.sources):
        try:
            shards = expand_braces(s.pattern)
        except ValueError as exc:
            raise ConfigError(f"data.sources[{i}].pattern: {exc}") from None
        present = [p for p in shards if os.path.isfile(p)]
        if not present:
            raise ConfigError(f"data.sources[{i}].pattern {s.pattern!r}: none of its {len(shards)} shards exist")
        if len(present) < len(shards):
            log.warning("source %d: %d of %d shards missing (e.g. %s); they will be counted as unreadable",
                        i, len(shards) - len(present), len(shards), next(p for p in shards if p not in present))
        # Keep missing ones in the list: the layout must not change when a file reappears.
        out.append(shards)
    return out


class MultiCropBatches(IterableDataset):
    """Iterable of collated batches for one rank, starting at ``start_sample``."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, start_sample: int = 0,
                 shards: list[list[str]] | None = None):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        if start_sample < 0 or start_sample % cfg.batch_size:
            raise ValueError(f"start_sample ({start_sample}) must be a non-negative multiple of "
                             f"batch_size ({cfg.batch_size}): resume from a batch's next_sample")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.start_batch = start_sample // cfg.batch_size
        self.shards = shards if shards is not None else expand_sources(cfg)
        self.weights = [s.weight for s in cfg.sources]
        grid = cfg.crops.global_crops_size // cfg.patch_size
        self.mask_generator = MaskingGenerator(
            (grid, grid),
            min_num_patches=cfg.mask_min_patches,
            max_num_patches=cfg.mask_max_patches_fraction * grid * grid,
            min_aspect=cfg.mask_min_aspect,
            max_aspect=cfg.mask_max_aspect,
        )
        self.n_tokens = grid * grid
        self.augment = DataAugmentationDINO.from_config(cfg.crops)
        # Set by build_train_loader when colour ops run on the GPU: workers then only decode and crop.
        self.photometric_on_device = False

    def _make_stream(self, k: int, counters: Counter) -> SampleStream:
        K = self.cfg.streams_per_rank
        return SampleStream(self.shards, self.weights, self.cfg.seed, self.rank * K + k,
                            self.world_size * K, self.cfg.shuffle_buffer, counters)

    def _load(self, reader: RangeReader, ref, counters: Counter):
        try:
            data = reader.read(ref.shard, ref.offset, ref.size)
            return self.augment.decode(data, self.cfg.max_pixels)
        except DecodeError as exc:
            counters[exc.reason] += 1
        except ShortRead:
            counters["short_read"] += 1
        except OSError as exc:
            counters["shard_unreadable"] += 1
            log.warning("reading %s from %s: %s", ref.key, ref.shard, exc)
        return None

    def _batch(self, j: int, stream: SampleStream, reader: RangeReader, counters: Counter) -> dict | None:
        B = self.cfg.batch_size
        refs = [stream.next_ref() for _ in range(B)]
        images = [self._load(reader, r, counters) for r in refs]
        good = [i for i, im in enumerate(images) if im is not None]
        if not good:
            counters["empty_batch"] += 1
            return None
        samples = []
        for i in range(B):
            # A bad slot borrows the next good image (cyclically); its crops still come from the
            # slot's own seed, so they differ from the lender's.
            src = i if images[i] is not None else min(good, key=lambda g: (g - i) % B)
            rng = rng_for(self.cfg.seed, TAG_AUGMENT, self.rank, j * B + i)
            try:
                samples.append(self.augment.crops_uint8(images[src], rng, not self.photometric_on_device))
            except Exception as exc:  # noqa: BLE001 - one odd image must never stop the rank
                counters["augment_error"] += 1
                log.warning("augmenting %s: %s", refs[src].key, exc)
        if not samples:
            counters["empty_batch"] += 1
            return None
        n_ok = len(samples)
        while len(samples) < B:  # only after augment errors: reuse finished samples
            samples.append(samples[len(samples) % n_ok])
        batch = collate_data_and_cast(
            samples,
            (self.cfg.mask_ratio_min, self.cfg.mask_ratio_max),
            self.cfg.mask_sample_probability,
            self.cfg.dtype,
            self.n_tokens,
            self.mask_generator,
            rng_for(self.cfg.seed, TAG_MASK, self.rank, j),
            normalize=(self.cfg.crops.mean, self.cfg.crops.std),
        )
        batch["keys"] = [r.key for r in refs]
        batch["sources"] = torch.tensor([r.source for r in refs], dtype=torch.long)
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            torch.set_num_threads(self.cfg.worker_threads)
        K = self.cfg.streams_per_rank
        if K % n_workers:
            raise ConfigError(f"{n_workers} workers do not divide streams_per_rank={K}")
        j0 = self.start_batch
        counters: Counter = Counter()
        streams: dict[int, SampleStream] = {}
        for k in range(K):
            if (k - j0) % n_workers == worker:
                streams[k] = self._make_stream(k, counters)
                streams[k].skip(self.cfg.batch_size * stream_batches_before(j0, k, K))
        reader = RangeReader()
        B = self.cfg.batch_size
        j = j0 + worker
        try:
            while True:
                batch = self._batch(j, streams[j % K], reader, counters)
                if batch is None:
                    # Keep the round-robin order intact: the main process drops this marker.
                    batch = {"empty": True}
                batch.update(sample_index=j * B, next_sample=(j + 1) * B, worker=worker,
                             counters=dict(counters))
                yield batch
                j += n_workers
        finally:
            reader.close()


class TrainLoader:
    """Iterable of collated batches plus the bad-sample counters (summed over workers).

    Each batch also carries ``sample_index`` (its first rank-local sample) and ``next_sample``
    (pass it as ``start_sample`` to resume right after this batch; ``state_dict()`` returns the
    value for the last batch handed out).  Iterating again continues after that batch.
    """

    def __init__(self, dataset: MultiCropBatches, loader: DataLoader):
        self.dataset = dataset
        self.loader = loader
        self._worker_counters: dict[int, dict[str, int]] = {}
        self._earlier_counts: Counter = Counter()  # from previous iterations' workers
        self.next_sample = dataset.start_batch * dataset.cfg.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # A new iteration continues right after the last batch handed out (workers restart there).
        self.dataset.start_batch = self.next_sample // self.dataset.cfg.batch_size
        for c in self._worker_counters.values():  # new workers count from zero again
            self._earlier_counts.update(c)
        self._worker_counters.clear()
        empty_run = 0
        limit = self.dataset.cfg.max_consecutive_empty_batches
        for batch in self.loader:
            self._worker_counters[int(batch.pop("worker"))] = batch.pop("counters")
            self.next_sample = int(batch["next_sample"])
            if batch.get("empty"):
                empty_run += 1
                if empty_run >= limit:
                    raise DataError(
                        f"{empty_run} consecutive batches without a single decodable image "
                        f"(problems so far: {self.bad_sample_counts()})"
                    )
                continue
            empty_run = 0
            if self.dataset.photometric_on_device:
                c = self.dataset.cfg.crops
                batch = augment_batch(batch, torch.device("cuda", torch.cuda.current_device()), c.mean, c.std,
                                      resolve_dtype(self.dataset.cfg.dtype), c.solarize_threshold)
            yield batch

    def state_dict(self) -> dict[str, int]:
        """What a checkpoint needs to resume this rank's stream exactly."""
        return {"next_sample": self.next_sample}

    def bad_sample_counts(self) -> dict[str, int]:
        """Problems seen so far by reason (decode reasons, truncated_tar, no_image, …)."""
        total: Counter = Counter(self._earlier_counts)
        for c in self._worker_counters.values():
            total.update(c)
        return dict(total)


def build_train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, start_sample: int = 0) -> TrainLoader:
    """The training DataLoader for ``rank``; ``start_sample`` = rank-local samples already consumed."""
    dataset = MultiCropBatches(cfg, rank, world_size, start_sample)
    dataset.photometric_on_device = cfg.crops.colour_ops_on == ColourOpsOn.cuda and torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if cfg.num_workers > 0:
        kwargs.update(prefetch_factor=cfg.prefetch_factor, persistent_workers=False)
    loader = DataLoader(
        dataset,
        batch_size=None,  # the dataset yields whole batches
        num_workers=cfg.num_workers,
        pin_memory=bool(cfg.pin_memory and torch.cuda.is_available()),
        **kwargs,
    )
    return TrainLoader(dataset, loader)
