"""Geometric verification of copy candidates: local features + one similarity transform.

A global descriptor sees "a hand on a wall" in every hand photo, so a crop of one photo and a
different photo of the same kind can sit at the same cosine (bench/RESULTS.md).  What tells them
apart is that a copy shows the *same pixels*: many local features of the copy map onto the
original under one scale + rotation + translation (optionally mirrored).  For each candidate
pair (an image and one of its nearest neighbours by embedding that the cosine threshold did not
already link), this module counts such features:

1. SIFT keypoints on the grey image scaled so its longer side is ``max_side`` (up to
   ``max_keypoints``, strongest first), for the image and its mirror image;
2. RootSIFT descriptors, mutual nearest neighbours that also pass Lowe's ratio test;
3. RANSAC of a 4-degree-of-freedom similarity transform (OpenCV, fixed seed); a model with an
   implausible scale or rotation is rejected; the score is its inlier count, the best over
   "as is" and "mirrored".

The pair is a copy when the inliers reach ``min_inliers`` (explicit, or calibrated on planted
copies with the cosine threshold: curation/calibrate_verify.py).  Every step is deterministic: the same
pair gives the same count whatever the order, thread count or cache state.

Cost: one feature extraction per image taking part in a candidate pair (~10–30 ms on one core)
and ~1 ms per pair; features stay in a bounded cache (``cache_images``).  It is meant for the
candidates a global descriptor cannot decide, so ``candidates`` bounds the pairs per image.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class VerifyConfig:
    """``dedup.verify`` / ``decontaminate.verify``."""

    enabled: bool = False
    candidates: int = 16  # nearest neighbours per image verified (those under the cosine threshold)
    min_similarity: float = -1.0  # candidates need at least this cosine (in the stage's space)
    min_inliers: int | None = None  # null = calibrated with the cosine threshold
    max_side: int = 384  # longer image side for the keypoints (small photos are upscaled)
    max_keypoints: int = 500
    ratio: float = 0.8  # Lowe's ratio test on descriptor distances
    ransac_tolerance: float = 0.012  # reprojection error allowed, as a share of max_side
    cache_images: int = 4096  # feature sets kept in memory (~130 KB each at 500 keypoints)

    def validate(self, name: str) -> None:
        from dinov2.utils.config import ConfigError

        if self.candidates < 1 or self.cache_images < 2:
            raise ConfigError(f"{name}.candidates must be >= 1 and {name}.cache_images >= 2")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"{name}.min_similarity must be a cosine in [-1, 1]")
        if self.min_inliers is not None and self.min_inliers < 3:
            raise ConfigError(f"{name}.min_inliers must be >= 3 (a similarity transform needs 2 points) or null")
        if not 64 <= self.max_side <= 2048 or not 16 <= self.max_keypoints <= 10_000:
            raise ConfigError(f"{name}.max_side must be in 64..2048 and {name}.max_keypoints in 16..10000")
        if not 0.5 <= self.ratio <= 1.0 or not 0.001 <= self.ransac_tolerance <= 0.1:
            raise ConfigError(f"{name}.ratio must be in [0.5, 1] and {name}.ransac_tolerance in [0.001, 0.1]")


@dataclass
class LocalFeatures:
    points: tuple[np.ndarray, np.ndarray]  # float32 [n, 2] keypoint positions: image, mirror image
    descriptors: tuple[np.ndarray, np.ndarray]  # uint8 [n, 128] SIFT descriptors: image, mirror image

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.points + self.descriptors)


def extract(image, cfg: VerifyConfig) -> LocalFeatures:
    """SIFT keypoints of ``image`` (PIL or HxW[x3] uint8 array) and of its mirror image."""
    import cv2

    grey = np.asarray(image.convert("L") if hasattr(image, "convert") else image)
    if grey.ndim == 3:
        grey = cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape[:2]
    s = cfg.max_side / max(h, w, 1)
    size = (max(8, round(w * s)), max(8, round(h * s)))
    grey = cv2.resize(np.ascontiguousarray(grey), size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    sift = cv2.SIFT_create(nfeatures=cfg.max_keypoints)
    pts, descs = [], []
    for img in (grey, np.ascontiguousarray(grey[:, ::-1])):
        kps, d = sift.detectAndCompute(img, None)
        if d is None or not kps:
            pts.append(np.zeros((0, 2), np.float32))
            descs.append(np.zeros((0, 128), np.uint8))
            continue
        pts.append(np.asarray([k.pt for k in kps], np.float32))
        descs.append(np.clip(np.rint(d), 0, 255).astype(np.uint8))
    return LocalFeatures((pts[0], pts[1]), (descs[0], descs[1]))


def _root_sift(d: np.ndarray) -> np.ndarray:
    d = d.astype(np.float32)
    return np.sqrt(d / (d.sum(1, keepdims=True) + 1e-7))


def _inliers_one(pa: np.ndarray, da: np.ndarray, pb: np.ndarray, db: np.ndarray, cfg: VerifyConfig) -> int:
    import cv2

    if len(da) < 3 or len(db) < 3:
        return 0
    sim = _root_sift(da) @ _root_sift(db).T  # RootSIFT rows have unit norm: cosine
    best = sim.argmax(1)
    mutual = sim.argmax(0)[best] == np.arange(len(da))
    top2 = -np.partition(-sim, 1, axis=1)[:, :2]  # best, second best
    dist = np.sqrt(np.maximum(2.0 - 2.0 * top2, 0.0))
    keep = mutual & (dist[:, 0] < cfg.ratio * dist[:, 1])
    src, dst = pa[keep], pb[best[keep]]
    if len(src) < 3:
        return 0
    cv2.setRNGSeed(0)
    model, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                             ransacReprojThreshold=cfg.max_side * cfg.ransac_tolerance,
                                             maxIters=1000, confidence=0.995, refineIters=0)
    if model is None or inl is None:
        return 0
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    angle = float(np.degrees(np.arctan2(model[1, 0], model[0, 0])))
    if not 0.2 < scale < 5.0 or abs(angle) > 30.0:  # copies are not tiny, huge or turned
        return 0
    return int(inl.sum())


def count_inliers(a: LocalFeatures, b: LocalFeatures, cfg: VerifyConfig) -> int:
    """Inliers of the best similarity transform from ``a`` (as is, or mirrored) onto ``b``."""
    return max(_inliers_one(a.points[m], a.descriptors[m], b.points[0], b.descriptors[0], cfg) for m in (0, 1))


class FeatureCache:
    """Features by key, extracted on demand from ``load(key) -> image | None`` (LRU-bounded)."""

    def __init__(self, load: Callable[[object], object], cfg: VerifyConfig):
        self.load, self.cfg = load, cfg
        self._cache: OrderedDict = OrderedDict()
        self.extracted = 0
        self.unreadable = 0

    def get(self, key) -> LocalFeatures | None:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        image = self.load(key)
        feats = extract(image, self.cfg) if image is not None else None
        self.extracted += 1
        self.unreadable += image is None
        self._cache[key] = feats
        if len(self._cache) > self.cfg.cache_images:
            self._cache.popitem(last=False)
        return feats


def verify_pairs(a: np.ndarray, b: np.ndarray, cache_a: FeatureCache, cache_b: FeatureCache | None = None
                 ) -> np.ndarray:
    """Inlier count per pair ``(a[i], b[i])`` (0 where either image cannot be read again).

    Pairs are visited grouped by ``a`` so each ``a`` is extracted once per run of pairs."""
    cache_b = cache_b or cache_a
    out = np.zeros(len(a), np.int32)
    for i in np.lexsort((np.asarray(b), np.asarray(a))):
        fa, fb = cache_a.get(a[i]), cache_b.get(b[i])
        if fa is not None and fb is not None:
            out[i] = count_inliers(fa, fb, cache_a.cfg)
    return out


def stored_pair_verifier(out_dir, source_a: str, ids_a: np.ndarray, cfg: VerifyConfig, max_pixels: int | None = None,
                         source_b: str | None = None, ids_b: np.ndarray | None = None):
    """``fn(rows_a, rows_b) -> inliers`` over rows of embedded sources, images read again by id.

    ``source_*``: the source name or prefix (``pool``, ``eval-``); without ``ids_b`` both rows index
    ``ids_a``.  ``fn.caches``: the feature caches (one, or one per side), for their counts."""
    from curation.reread import ImageReader
    from dinov2.data.decode import DEFAULT_MAX_PIXELS

    def cache(source: str, ids: np.ndarray) -> FeatureCache:
        reader = ImageReader(out_dir, source, max_pixels or DEFAULT_MAX_PIXELS)
        return FeatureCache(lambda row: reader(ids[row]), cfg)

    cache_a = cache(source_a, ids_a)
    cache_b = cache_a if ids_b is None else cache(source_b or source_a, ids_b)

    def fn(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return verify_pairs(a, b, cache_a, cache_b)

    fn.caches = (cache_a,) if cache_b is cache_a else (cache_a, cache_b)
    return fn


def candidate_pairs(query_rows: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, threshold: float,
                    cfg: VerifyConfig, self_search: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query row, neighbour row) worth verifying from a k-NN result (k ≥ ``cfg.candidates``).

    Keeps each query's first ``candidates`` neighbours with ``min_similarity <= cosine <
    threshold`` (those at or above the threshold are already linked); in a self-search each
    unordered pair is kept once (smaller row first)."""
    sims, nbrs = sims[:, : cfg.candidates], nbrs[:, : cfg.candidates]
    q = np.broadcast_to(np.asarray(query_rows)[:, None], nbrs.shape)
    keep = (nbrs >= 0) & np.isfinite(sims) & (sims >= cfg.min_similarity) & (sims < threshold)
    qa, nb = q[keep].astype(np.int64), nbrs[keep].astype(np.int64)
    if self_search:
        keep = qa != nb
        lo, hi = np.minimum(qa[keep], nb[keep]), np.maximum(qa[keep], nb[keep])
        pairs = np.unique(np.stack([lo, hi], 1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
        return pairs[:, 0], pairs[:, 1]
    return qa, nb
