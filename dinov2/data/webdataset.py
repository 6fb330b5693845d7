"""Deterministic, resumable streams of samples from WebDataset-style tar shards.

Design (why it resumes exactly and scales):

* A *source* is a list of shards (brace pattern) with a mixing weight.
* Each rank owns ``streams_per_rank`` independent *streams* (a fixed number, NOT the number of
  DataLoader workers), so the whole stream layout is a pure function of
  ``(seed, rank, world_size, streams_per_rank)``.  Globally there are
  ``num_slots = world_size * streams_per_rank`` slots; slot ``rank * streams_per_rank + k``.
* Per source and epoch, the shards are cut into *virtual shards* (a shard is split into ``nparts``
  interleaved parts when there are fewer shards than slots), permuted with a seed that depends only
  on ``(seed, source, epoch)`` and dealt round-robin to the slots: within an epoch the slots read
  disjoint samples that together cover the source.  Each slot walks its own epochs at its own pace.
* Inside a slot, each source goes through a seeded shuffle buffer; a seeded draw per sample picks
  the source according to the weights.
* Everything above handles :class:`SampleRef` objects (shard path + byte offset/size of the image
  member, taken from tar headers only), so skipping ``n`` samples never reads or decodes image
  bytes: :meth:`SampleStream.skip` is what makes resume cheap.

The shard format itself (keys, image extensions, header listing, byte ranges) is
:mod:`dinov2.data.shards`.  Damaged shards never stop a stream: a truncated tar is read up to the
damage, the problem is counted, and the stream moves on to the next shard.
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from dinov2.data.shards import RangeReader, group_samples, list_tar

log = logging.getLogger(__name__)

# Distinct tags keep the random streams for different purposes independent of each other.
TAG_SHARD_PERMUTATION = 1
TAG_SHUFFLE = 2
TAG_MIX = 3
TAG_AUGMENT = 4
TAG_MASK = 5

# Shard-level problem reasons (image-level reasons come from dinov2.data.decode.REASONS).
SHARD_REASONS = (
    "truncated_tar",  # the tar ends inside a member or header: read up to the damage
    "tar_error",  # not a tar / bad header checksum / compressed tar
    "shard_unreadable",  # missing file or OS error opening it
    "no_image",  # a sample without an image member
    "short_read",  # the file shrank between scanning and reading
)


class DataError(RuntimeError):
    """A data source cannot produce any samples at all (configuration problem)."""


def rng_for(seed: int, tag: int, *keys: int) -> np.random.Generator:
    """Independent, reproducible generator for a purpose (``tag``) and position (``keys``)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, tag, *[int(k) for k in keys]])


# --------------------------------------------------------------------------------------------
# Shard scanning (headers only) and byte reading
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image lives; cheap to create, shuffle and skip."""

    source: int
    shard: str
    key: str
    ext: str
    offset: int
    size: int


@dataclass
class ShardScan:
    refs: list[SampleRef]
    problems: Counter  # reason -> count (e.g. truncated_tar, no_image)
    detail: str = ""


def scan_shard(path: str, source: int = 0, use_tarfile: bool = False) -> ShardScan:
    """List the samples of a tar shard from its headers, stopping at the first damage."""
    try:
        listing = list_tar(path, use_tarfile)
    except OSError as exc:
        return ShardScan([], Counter(shard_unreadable=1), f"{path}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a malformed shard must never stop a rank
        log.warning("shard problem: %s: %s: %s", path, type(exc).__name__, exc)
        return ShardScan([], Counter(tar_error=1), f"{path}: {type(exc).__name__}: {exc}")
    refs: list[SampleRef] = []
    problems: Counter = Counter()
    for sample in group_samples(listing.members):
        picked = sample.image()
        if picked is None:
            problems["no_image"] += 1
            continue
        ext, m = picked
        refs.append(SampleRef(source, path, sample.key, ext, m.offset, m.size))
    detail = ""
    if listing.damage is not None:
        problems[listing.damage.reason] += 1
        detail = f"{path}: {listing.damage.detail}"
        log.warning("shard problem: %s", detail)
    return ShardScan(refs, problems, detail)


def iter_tar_samples(path: str, counters: Counter | None = None) -> Iterator[tuple[str, str, bytes]]:
    """Sequentially yield ``(key, ext, image_bytes)`` of one shard (for evaluation / tools)."""
    scan = scan_shard(path)
    if counters is not None:
        counters.update(scan.problems)
    with RangeReader(max_open=1) as reader:
        for ref in scan.refs:
            yield ref.key, ref.ext, reader.read(ref.shard, ref.offset, ref.size)


# --------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------
class SourceSlotStream:
    """Infinite, epoch-based sequence of one source's samples for one slot (no shuffle yet)."""

    def __init__(
        self,
        shards: Sequence[str],
        source: int,
        seed: int,
        slot: int,
        num_slots: int,
        counters: Counter,
    ):
        if not shards:
            raise DataError(f"source {source} has no shards")
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} out of range for {num_slots} slots")
        self.shards = list(shards)
        self.source = source
        self.seed = seed
        self.slot = slot
        self.num_slots = num_slots
        self.counters = counters
        # Fewer shards than slots: split each shard into interleaved parts so every slot gets data.
        self.nparts = max(1, math.ceil(num_slots / len(self.shards)))
        self._cache_path: str | None = None
        self._cache_scan: ShardScan | None = None

    def epoch_assignment(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, part) pairs this slot reads in ``epoch``; disjoint across slots."""
        n_virtual = len(self.shards) * self.nparts
        perm = rng_for(self.seed, TAG_SHARD_PERMUTATION, self.source, epoch).permutation(n_virtual)
        return [(int(v) // self.nparts, int(v) % self.nparts) for v in perm[self.slot :: self.num_slots]]

    def _scan(self, path: str) -> ShardScan:
        if path != self._cache_path:
            self._cache_scan = scan_shard(path, self.source)
            self._cache_path = path
            self.counters.update(self._cache_scan.problems)
        assert self._cache_scan is not None
        return self._cache_scan

    def epoch_refs(self, epoch: int) -> Iterator[SampleRef]:
        for shard_index, part in self.epoch_assignment(epoch):
            refs = self._scan(self.shards[shard_index]).refs
            yield from refs[part :: self.nparts]

    def __iter__(self) -> Iterator[SampleRef]:
        empty_epochs = 0
        # After this many consecutive empty epochs every shard has very likely been tried.
        give_up = len(self.shards) * self.nparts + 2
        epoch = 0
        while True:
            produced = 0
            for ref in self.epoch_refs(epoch):
                produced += 1
                yield ref
            empty_epochs = 0 if produced else empty_epochs + 1
            if empty_epochs >= give_up:
                raise DataError(
                    f"source {self.source} ({self.shards[0]} …, {len(self.shards)} shards) produced no "
                    f"readable samples for slot {self.slot} in {empty_epochs} consecutive epochs"
                )
            epoch += 1


class _Uniforms:
    """Uniform [0, 1) numbers drawn from ``rng`` in blocks (one numpy call per 4096 draws)."""

    def __init__(self, rng: np.random.Generator, block: int = 4096):
        self.rng = rng
        self.block = block
        self._values: list[float] = []
        self._pos = 0

    def next(self) -> float:
        if self._pos == len(self._values):
            self._values = self.rng.random(self.block).tolist()
            self._pos = 0
        self._pos += 1
        return self._values[self._pos - 1]


class ShuffleBuffer:
    """Seeded reservoir-style shuffle: keep ``size`` items, emit a uniformly drawn one."""

    def __init__(self, items: Iterator[SampleRef], size: int, rng: np.random.Generator):
        self.items = items
        self.size = max(1, size)
        self.uniforms = _Uniforms(rng)
        self.buf: list[SampleRef] = []

    def next(self) -> SampleRef:
        buf = self.buf
        while len(buf) < self.size:
            buf.append(next(self.items))
        i = int(self.uniforms.next() * len(buf))
        item = buf[i]
        buf[i] = buf[-1]
        buf.pop()
        return item


class SampleStream:
    """One slot's mixed, shuffled, infinite sequence of :class:`SampleRef` (headers only)."""

    def __init__(
        self,
        sources: Sequence[Sequence[str]],
        weights: Sequence[float],
        seed: int,
        slot: int,
        num_slots: int,
        shuffle_buffer: int,
        counters: Counter | None = None,
    ):
        if len(sources) != len(weights) or not sources:
            raise ValueError("need one weight per source and at least one source")
        w = np.asarray(weights, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"source weights must be positive, got {list(weights)}")
        self.counters = counters if counters is not None else Counter()
        self.cum_weights = np.cumsum(w / w.sum())
        self.mix = _Uniforms(rng_for(seed, TAG_MIX, slot, num_slots))
        self.buffers = [
            ShuffleBuffer(
                iter(SourceSlotStream(shards, s, seed, slot, num_slots, self.counters)),
                shuffle_buffer,
                rng_for(seed, TAG_SHUFFLE, s, slot, num_slots),
            )
            for s, shards in enumerate(sources)
        ]
        self.position = 0  # samples handed out (or skipped) so far

    def next_ref(self) -> SampleRef:
        if len(self.buffers) == 1:
            source = 0
        else:
            u = self.mix.next()
            source = min(int(np.searchsorted(self.cum_weights, u, side="right")), len(self.buffers) - 1)
        self.position += 1
        return self.buffers[source].next()

    def skip(self, n: int) -> None:
        """Advance by ``n`` samples without reading or decoding any image."""
        for _ in range(n):
            self.next_ref()


def stream_batches_before(first_batch: int, stream: int, num_streams: int) -> int:
    """How many of the batches ``0 .. first_batch-1`` belong to ``stream`` (batch j → j % K)."""
    if first_batch <= stream:
        return 0
    return (first_batch - stream + num_streams - 1) // num_streams
