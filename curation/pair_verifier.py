"""Verification at scale: features extracted once per image, pair scores kept, images read again by id.

curation/verify.py holds what a pair's score *is* (features, matching, the pixel check); this
module runs it over many pairs: a bounded cache of features per source, shared by a stage and its
calibration in one process (:func:`image_features`), extraction spread over the task's cores
(:func:`extract_many`: OpenCV and the JPEG decoder release the GIL), scores memoised per pair.
Results do not depend on the thread count, the cache state or the order pairs come in.
"""
from __future__ import annotations

import itertools
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from curation.verify import (
    LocalFeatures,
    PairScores,
    VerifyConfig,
    chance_inliers,
    extract,
    match,
    root_sift,
)

MAX_WORKERS = 8  # extraction threads at most (more cores than this rarely sit idle during a stage)
PREFETCH_PAIRS = 2048  # pairs whose images are extracted together before they are matched
ROOTS_KEPT = 512  # RootSIFT arrays kept while matching a run of pairs (~256 KB each at 500 keypoints)


def extraction_workers() -> int:
    """Threads for feature extraction: the cores this process may use, at most ``MAX_WORKERS``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, cores))


def extract_many(load: Callable[[object], object], keys: Sequence, cfg: VerifyConfig,
                 workers: int | None = None) -> list[tuple[LocalFeatures | None, bool]]:
    """``(features, unreadable)`` of each key, in order: ``load(key) -> image | None`` and
    :func:`verify.extract` run on ``workers`` threads (measured ~2.5x on 2 cores: bench/RESULTS.md)."""
    def one(key):
        image = load(key)
        return (extract(image, cfg), False) if image is not None else (None, True)

    workers = workers or extraction_workers()
    if workers < 2 or len(keys) < 2:
        return [one(k) for k in keys]
    with ThreadPoolExecutor(min(workers, len(keys))) as pool:
        return list(pool.map(one, keys))


_SERIALS = itertools.count()


class FeatureCache:
    """Features by key, extracted on demand from ``load(key) -> image | None`` (LRU-bounded)."""

    def __init__(self, load: Callable[[object], object], cfg: VerifyConfig):
        self.load, self.cfg = load, cfg
        self._cache: OrderedDict = OrderedDict()
        self.extracted = 0
        self.unreadable = 0
        self.pair_scores: dict = {}  # (other cache's serial, own key, other key) -> (inliers, correlation, keypoints)
        self.serial = next(_SERIALS)  # unlike id(), never reused by a later cache

    def get(self, key) -> LocalFeatures | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return self._put(key, self.load(key))

    def of_image(self, key, image) -> LocalFeatures:
        """Features of ``image``, already in hand, under ``key`` (cached ones when present)."""
        if key in self._cache and self._cache[key] is not None:
            self._cache.move_to_end(key)
            return self._cache[key]
        return self._put(key, image)

    def add_images(self, keys: Sequence, images: Sequence) -> None:
        """Cache the features of images already in hand under ``keys`` (extracted on every core)."""
        todo = [(k, im) for k, im in zip(keys, images) if self._cache.get(k) is None]
        for (key, _), (feats, unreadable) in zip(todo, extract_many(lambda im: im, [im for _, im in todo], self.cfg)):
            self._store(key, feats, unreadable)

    def prefetch(self, keys) -> None:
        """Extract the features of the ``keys`` not cached yet, several images at a time (at most
        half the cache, so nothing the caller is about to use is evicted by its own prefetch)."""
        missing = [k for k in dict.fromkeys(keys) if k not in self._cache][: max(1, self.cfg.cache_images // 2)]
        if len(missing) > 1:
            for key, (feats, unreadable) in zip(missing, extract_many(self.load, missing, self.cfg)):
                self._store(key, feats, unreadable)

    def _put(self, key, image) -> LocalFeatures | None:
        return self._store(key, extract(image, self.cfg) if image is not None else None, image is None)

    def _store(self, key, feats: LocalFeatures | None, unreadable: bool) -> LocalFeatures | None:
        self.extracted += 1
        self.unreadable += unreadable
        self._cache[key] = feats
        if len(self._cache) > self.cfg.cache_images:
            self._cache.popitem(last=False)
        return feats


def verify_pairs(a: np.ndarray, b: np.ndarray, cache_a: FeatureCache, cache_b: FeatureCache | None = None,
                 keys_a=None, keys_b=None, unreadable: set | None = None) -> PairScores:
    """Inliers and aligned correlation per pair ``(a[i], b[i])`` (0 where either image cannot be read again).

    ``keys_*``: cache key of each row (default: the row itself); ``unreadable`` receives the keys
    that could not be read.  Pairs are visited grouped by ``a`` so each ``a`` is looked up once per
    run of pairs.  Within one source a pair is scored in one direction (smaller key first) and
    every score is kept with the ``a`` cache, so a stage re-uses what its calibration scored."""
    cache_b = cache_b or cache_a
    keys_b = keys_a if keys_b is None and cache_b is cache_a else keys_b
    out = PairScores(np.zeros(len(a), np.int32), np.zeros(len(a), np.float32), np.zeros(len(a), np.int32))
    memo = cache_a.pair_scores
    if len(memo) > 64 * cache_a.cfg.cache_images:  # bounded like the features: start over
        memo.clear()
    order = np.lexsort((np.asarray(b), np.asarray(a)))
    for start in range(0, len(order), PREFETCH_PAIRS):
        todo = []
        for i in order[start:start + PREFETCH_PAIRS]:
            ka = a[i] if keys_a is None else keys_a[a[i]]
            kb = b[i] if keys_b is None else keys_b[b[i]]
            if cache_b is cache_a and kb < ka:
                ka, kb = kb, ka
            if (cache_b.serial, ka, kb) in memo:
                out.inliers[i], out.correlation[i], out.keypoints[i] = memo[(cache_b.serial, ka, kb)]
            else:
                todo.append((i, ka, kb))
        if cache_b is cache_a:
            cache_a.prefetch([k for _, ka, kb in todo for k in (ka, kb)])
        else:
            cache_a.prefetch([ka for _, ka, _ in todo])
            cache_b.prefetch([kb for _, _, kb in todo])
        _score(todo, cache_a, cache_b, memo, out, unreadable)
    return out


def _score(todo, cache_a: FeatureCache, cache_b: FeatureCache, memo: dict, out: PairScores,
           unreadable: set | None) -> None:
    roots: dict = {}  # RootSIFT of the images of this run of pairs (each takes part in several)

    def root(cache, key, feats):
        if (cache.serial, key) not in roots:
            if len(roots) >= ROOTS_KEPT:
                roots.clear()
            roots[(cache.serial, key)] = root_sift(feats)
        return roots[(cache.serial, key)]

    for i, ka, kb in todo:
        pair = (cache_b.serial, ka, kb)
        if pair in memo:  # the same pair twice in one call
            out.inliers[i], out.correlation[i], out.keypoints[i] = memo[pair]
            continue
        fa, fb = cache_a.get(ka), cache_b.get(kb)
        if fa is not None and fb is not None:
            scores = match(fa, fb, cache_a.cfg, root(cache_a, ka, fa), root(cache_b, kb, fb))
            memo[pair] = (*scores, min(len(fa.points), len(fb.points)))
            out.inliers[i], out.correlation[i], out.keypoints[i] = memo[pair]
        elif unreadable is not None:
            unreadable.update(k for k, f in ((ka, fa), (kb, fb)) if f is None)


_SHARED: OrderedDict = OrderedDict()  # process-wide feature caches (image_features)
_SHARED_CACHES = 4


def image_features(out_dir, source: str, cfg: VerifyConfig, max_pixels: int | None = None) -> FeatureCache:
    """The feature cache of the embedded images of ``source`` (a name or prefix), keyed by image id.

    Process-wide: a stage and its calibration run in one job and verify many of the same images,
    so they share it.  Keyed by the output folder, the source, the feature and matching settings
    and the embed shards' sizes and times, so a re-embedded source never sees another's features."""
    from curation import layout
    from dinov2.data.decode import DEFAULT_MAX_PIXELS

    out = Path(out_dir).resolve()
    max_pixels = max_pixels or DEFAULT_MAX_PIXELS
    shards = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size)
                   for src in layout.sources(out, source) for _, f in layout.embed_shards(out, src) if f.is_file())
    # the matching settings too: the cache also keeps pair scores
    key = (str(out), source, max_pixels, cfg.max_side, cfg.max_keypoints, cfg.cache_images, cfg.ratio,
           cfg.ransac_tolerance, chance_inliers(cfg.min_inliers), shards)
    if key in _SHARED:
        _SHARED.move_to_end(key)
        return _SHARED[key]
    reader = None
    lock = threading.Lock()  # extraction threads load images through one reader

    def load(image_id):
        nonlocal reader
        with lock:
            if reader is None:  # reading the locations costs a pass over the embed shards: only when needed
                from curation.reread import ImageReader

                reader = ImageReader(out, source, max_pixels)
                _ = image_id in reader.locs.index  # builds the id lookup table once, before threads share it
        return reader(image_id)

    cache = _SHARED[key] = FeatureCache(load, cfg)
    while len(_SHARED) > _SHARED_CACHES:
        _SHARED.popitem(last=False)
    return cache


class StoredPairVerifier:
    """``verifier(rows_a, rows_b) -> PairScores`` over rows of embedded sources, images read again by id.

    ``source_*``: the source name or prefix (``pool``, ``eval-``); without ``ids_b`` both rows index
    ``ids_a``.  ``images_read`` / ``unreadable``: what this verifier read (shared caches aside)."""

    def __init__(self, out_dir, source_a: str, ids_a: np.ndarray, cfg: VerifyConfig, max_pixels: int | None = None,
                 source_b: str | None = None, ids_b: np.ndarray | None = None):
        self.cfg = cfg
        self.ids_a = np.asarray(ids_a, dtype=object)
        self.cache_a = image_features(out_dir, source_a, cfg, max_pixels)
        if ids_b is None:
            self.ids_b, self.cache_b = self.ids_a, self.cache_a
        else:
            self.ids_b = np.asarray(ids_b, dtype=object)
            self.cache_b = image_features(out_dir, source_b or source_a, cfg, max_pixels)
        self._caches = list({id(c): c for c in (self.cache_a, self.cache_b)}.values())
        self._extracted_before = sum(c.extracted for c in self._caches)
        self.unreadable: set = set()

    @property
    def images_read(self) -> int:
        return sum(c.extracted for c in self._caches) - self._extracted_before

    def __call__(self, a: np.ndarray, b: np.ndarray) -> PairScores:
        return verify_pairs(a, b, self.cache_a, self.cache_b, self.ids_a, self.ids_b, self.unreadable)
