"""When a gather stage runs as one job and when as job-array tasks (``sharding:`` in the config).

The sharded path gives byte-identical outputs (see curation/dedup_sharded.py), so the choice is
about resources only: small pools stay one gathered job (fewer tasks, no intermediate files);
from ``min_items`` images on, no task holds the whole pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from curation.choices import Sharding, coerce


@dataclass
class ShardingConfig:
    mode: Sharding = Sharding.auto
    min_items: int = 5_000_000  # auto: sharded from this many ok pool images on
    block_items: int = 1_000_000  # pool rows per map task (blocks are whole embed shards)

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        self.mode = coerce(Sharding, self.mode, "sharding.mode")
        if self.min_items < 1 or self.block_items < 1:
            raise ConfigError("key 'sharding': min_items and block_items must be >= 1")

    def sharded(self, n_items: int) -> bool:
        if self.mode == Sharding.auto:
            return n_items >= self.min_items
        return self.mode == Sharding.sharded

    def num_blocks(self, n_items: int) -> int:
        return max(1, math.ceil(n_items / self.block_items))


def split_shards(counts: list[int], n_blocks: int) -> list[tuple[int, int]]:
    """Contiguous ranges of whole shards, ``n_blocks`` of them (fewer if there are fewer shards),
    balanced by rows: block boundaries at the shards nearest to multiples of total / n_blocks."""
    total = sum(counts)
    n_blocks = max(1, min(n_blocks, len(counts)))
    cum = [0]
    for c in counts:
        cum.append(cum[-1] + c)
    cuts = [0]
    for j in range(1, n_blocks):
        target = total * j / n_blocks
        best = min(range(cuts[-1] + 1, len(counts) - (n_blocks - j) + 1), key=lambda i: abs(cum[i] - target))
        cuts.append(best)
    cuts.append(len(counts))
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


def split_range(n: int, batch: int, n_tasks: int) -> list[tuple[int, int]]:
    """``n_tasks`` contiguous ranges of ``0..n`` that start at multiples of ``batch`` (empty ones dropped)."""
    n_batches = max(1, math.ceil(n / batch))
    n_tasks = max(1, min(n_tasks, n_batches))
    bounds = [min(n, (t * n_batches // n_tasks) * batch) for t in range(n_tasks + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
