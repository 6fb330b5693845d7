"""The trainer's batch stream, with its position as checkpointable state.

The position is the rank-local sample index the stream continues at (what ``start_sample`` of
:func:`dinov2.data.loader.build_train_loader` takes).  It is read from each batch's
``next_sample`` (the loader's own count), not derived from the step: a batch the loader dropped
because none of its images decoded still advances the stream, so ``steps × batch size`` would
fall behind and a resumed run would see batches twice.  Sources without ``next_sample`` (custom
test streams) advance by one batch per batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from dinov2.data.loader import DataConfig, TrainLoader, build_train_loader
from dinov2.train.distributed import DistInfo

# A batch source for tests and custom pipelines: f(rank, world_size, start_sample) -> iterator of
# collated batches (same keys as dinov2.data.collate).  Default: dinov2.data.loader.
BatchSourceFn = Callable[[int, int, int], Iterable[dict[str, Any]]]


class TrainData:
    def __init__(self, cfg: DataConfig, info: DistInfo, start_sample: int, batch_source: BatchSourceFn | None):
        self.batch_size = cfg.batch_size
        self.position = start_sample
        self._loader: TrainLoader | None = None
        if batch_source is None:
            self._loader = build_train_loader(cfg, rank=info.rank, world_size=info.world_size,
                                              start_sample=start_sample)
            iterable: Iterable[dict[str, Any]] = self._loader
        else:
            iterable = batch_source(info.rank, info.world_size, start_sample)
        self._it: Iterator[dict[str, Any]] = iter(iterable)
        # Pull the first batch now: lazy iterators start their DataLoader (and draw its worker seed
        # from torch's global RNG) on the first next(); the caller isolates that RNG use.
        self._first: dict[str, Any] | None = self._pull()

    def _pull(self) -> dict[str, Any]:
        try:
            return next(self._it)
        except StopIteration:
            raise RuntimeError("the training data stream ended (the loader should be infinite)") from None

    def next(self) -> dict[str, Any]:
        batch, self._first = (self._first, None) if self._first is not None else (self._pull(), None)
        nxt = batch.get("next_sample")
        self.position = int(nxt) if nxt is not None else self.position + self.batch_size
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position after the last batch handed out: resume passes it as ``start_sample``."""
        return {"next_sample": self.position}

    def bad_images(self) -> dict[str, int]:
        return dict(self._loader.bad_sample_counts()) if self._loader is not None else {}
