"""Geometric verification of copy candidates: local features + one similarity transform.

A global descriptor sees "a hand on a wall" in every hand photo, so a crop of one photo and a
different photo of the same kind can sit at the same cosine (bench/RESULTS.md).  What tells them
apart is that a copy shows the *same pixels*: many local features of the copy map onto the
original under one scale + rotation + translation (optionally mirrored).  For each candidate
pair (an image and one of its nearest neighbours by embedding that the cosine threshold did not
already link), this module counts such features:

1. SIFT keypoints on the grey image scaled so its longer side is ``max_side`` (up to
   ``max_keypoints``, strongest first); the mirror image's features are derived from them
   (:meth:`LocalFeatures.mirrored`), not extracted again;
2. RootSIFT descriptors, mutual nearest neighbours that also pass Lowe's ratio test;
3. RANSAC of a 4-degree-of-freedom similarity transform (OpenCV, fixed seed); a model with an
   implausible scale or rotation is rejected; the score is its inlier count, the best over
   "as is" and "mirrored".

The pair is a copy when the inliers reach ``min_inliers`` and the aligned pixels agree
(``min_correlation``; both explicit, or calibrated on planted copies with the cosine threshold:
curation/calibrate_verify.py).  The same scores also *refute* a cosine link: a pair over the
threshold whose two images both have ``refute_keypoints`` keypoints or more but share fewer than
8 inliers (or ``min_inliers`` if lower) is not a copy (:meth:`PairScores.refuted`).  Every step is deterministic: the same
pair gives the same count whatever the order, thread count or cache state.

Cost: one feature extraction per image taking part in a candidate pair and well under 1 ms per
pair (bench/RESULTS.md); curation/pair_verifier.py runs it over a stage's pairs (features in a
bounded cache, ``cache_images``, that the stage and its calibration share; extraction on every core).  It is meant for the
candidates a global descriptor cannot decide, so ``candidates`` bounds the pairs per image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


@dataclass
class VerifyConfig:
    """``dedup.verify`` / ``decontaminate.verify``."""

    enabled: bool = False
    candidates: int = 16  # nearest neighbours per image verified (those under the cosine threshold)
    min_similarity: float = -1.0  # candidates need at least this cosine (in the stage's space)
    min_inliers: int | None = None  # null = calibrated with the cosine threshold
    min_correlation: float | None = None  # aligned pixels must agree this much; null = calibrated
    max_side: int = 384  # longer image side for the keypoints (small photos are upscaled)
    max_keypoints: int = 500
    ratio: float = 0.8  # Lowe's ratio test on descriptor distances
    ransac_tolerance: float = 0.012  # reprojection error allowed, as a share of max_side
    cache_images: int = 8192  # feature sets kept in memory (~80 KB each at 500 keypoints)
    # a pair the cosine links is unlinked when both images have at least this many keypoints yet
    # share fewer than 8 inliers (or min_inliers if lower): geometry refutes it; 0 = the cosine always links
    refute_keypoints: int = 64

    def validate(self, name: str) -> None:
        from dinov2.utils.config import ConfigError

        if self.candidates < 1 or self.cache_images < 2:
            raise ConfigError(f"{name}.candidates must be >= 1 and {name}.cache_images >= 2")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ConfigError(f"{name}.min_similarity must be a cosine in [-1, 1]")
        if self.min_correlation is not None and not -1.0 <= self.min_correlation <= 1.0:
            raise ConfigError(f"{name}.min_correlation must be a correlation in [-1, 1] or null")
        if self.refute_keypoints < 0:
            raise ConfigError(f"{name}.refute_keypoints must be >= 0 (0: never refute a cosine link)")
        if self.min_inliers is not None and self.min_inliers < 3:
            raise ConfigError(f"{name}.min_inliers must be >= 3 (a similarity transform needs 2 points) or null")
        if not 64 <= self.max_side <= 2048 or not 16 <= self.max_keypoints <= 10_000:
            raise ConfigError(f"{name}.max_side must be in 64..2048 and {name}.max_keypoints in 16..10000")
        if not 0.5 <= self.ratio <= 1.0 or not 0.001 <= self.ransac_tolerance <= 0.1:
            raise ConfigError(f"{name}.ratio must be in [0.5, 1] and {name}.ransac_tolerance in [0.001, 0.1]")


# A horizontal mirror turns a keypoint's orientation θ into 180° − θ; in the keypoint's own frame
# that reverses the rows of SIFT's 4 × 4 cell grid and negates every gradient angle (orientation
# bin o → −o mod 8).  So the mirror image's descriptors are a fixed permutation of the image's:
# one extraction serves both (mean |difference| ~6 % of the mean bin against extracting the
# mirror image again, from resampling; tests/test_curation_verify.py).
_MIRROR_BINS = np.arange(128).reshape(4, 4, 8)[::-1][:, :, (8 - np.arange(8)) % 8].reshape(-1)


MIN_INLIERS_FLOOR = 8  # calibration never picks fewer inliers
THUMB_SHRINK = 4  # the pixel check compares the keypoint images shrunk this much (96 px at max_side 384)


@dataclass
class LocalFeatures:
    points: np.ndarray  # float32 [n, 2] keypoint positions (x, y) in the scaled image
    descriptors: np.ndarray  # uint8 [n, 128] SIFT descriptors
    thumb: np.ndarray  # uint8 grey thumbnail of the scaled image (THUMB_SHRINK× smaller, smoothed)
    size: tuple[int, int]  # (width, height) of the scaled image the points live in
    mirror: bool = False  # points and descriptors are those of the mirror image (thumb is not)

    @property
    def nbytes(self) -> int:
        return self.points.nbytes + self.descriptors.nbytes + self.thumb.nbytes

    def mirrored(self) -> LocalFeatures:
        """The features of the left-right mirror image (x negated: a similarity fit does not care where)."""
        return LocalFeatures(self.points * np.float32([-1.0, 1.0]), self.descriptors[:, _MIRROR_BINS], self.thumb,
                             self.size, not self.mirror)


def extract(image, cfg: VerifyConfig) -> LocalFeatures:
    """SIFT keypoints of ``image`` (PIL or HxW[x3] uint8 array) and its grey thumbnail."""
    import cv2

    grey = np.asarray(image.convert("L") if hasattr(image, "convert") else image)
    if grey.ndim == 3:
        grey = cv2.cvtColor(np.ascontiguousarray(grey), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape[:2]
    s = cfg.max_side / max(h, w, 1)
    size = (max(8, round(w * s)), max(8, round(h * s)))
    grey = cv2.resize(np.ascontiguousarray(grey), size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    thumb = cv2.resize(grey, (max(4, round(size[0] / THUMB_SHRINK)), max(4, round(size[1] / THUMB_SHRINK))),
                       interpolation=cv2.INTER_AREA)
    thumb = cv2.GaussianBlur(thumb, (0, 0), 0.7)  # tolerance for re-encoding and a pixel of misalignment
    kps, d = cv2.SIFT_create(nfeatures=cfg.max_keypoints).detectAndCompute(grey, None)
    if d is None or not kps:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.uint8), thumb, size)
    return LocalFeatures(np.asarray([k.pt for k in kps], np.float32), np.clip(np.rint(d), 0, 255).astype(np.uint8),
                         thumb, size)


def root_sift(f: LocalFeatures) -> np.ndarray:
    """RootSIFT rows of ``f``'s descriptors (unit norm), float32."""
    d = f.descriptors.astype(np.float32)
    return np.sqrt(d / (d.sum(1, keepdims=True) + 1e-7))


def _fit(points_a: np.ndarray, points_b: np.ndarray, cfg: VerifyConfig, root_a: np.ndarray,
         root_b: np.ndarray) -> tuple[int, np.ndarray | None]:
    """(inliers, 2×3 model from ``points_a`` to ``points_b``) of a RANSAC similarity fit; ``root_*``:
    their RootSIFT descriptors."""
    import cv2

    if len(root_a) < 3 or len(root_b) < 3:
        return 0, None
    sim = root_a @ root_b.T  # RootSIFT rows have unit norm: cosine
    rows = np.arange(len(root_a))
    best = sim.argmax(1)
    mutual = sim.argmax(0)[best] == rows
    first = sim[rows, best]
    sim[rows, best] = -np.inf  # what is left of each row holds its second best
    second = sim.max(1)
    keep = mutual & (np.sqrt(np.maximum(2.0 - 2.0 * first, 0.0))
                     < cfg.ratio * np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0)))
    src, dst = points_a[keep], points_b[best[keep]]
    if len(src) < 3:
        return 0, None
    cv2.setRNGSeed(0)
    model, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                             ransacReprojThreshold=cfg.max_side * cfg.ransac_tolerance,
                                             maxIters=1000, confidence=0.995, refineIters=0)
    if model is None or inl is None:
        return 0, None
    scale = float(np.hypot(model[0, 0], model[1, 0]))
    angle = float(np.degrees(np.arctan2(model[1, 0], model[0, 0])))
    if not 0.2 < scale < 5.0 or abs(angle) > 30.0:  # copies are not tiny, huge or turned
        return 0, None
    return int(inl.sum()), model


def _to_thumb(f: LocalFeatures) -> np.ndarray:
    """3×3 map from the scaled image's pixel coordinates to its thumbnail's (pixel centres kept)."""
    sx, sy = f.thumb.shape[1] / f.size[0], f.thumb.shape[0] / f.size[1]
    return np.array([[sx, 0, 0.5 * sx - 0.5], [0, sy, 0.5 * sy - 0.5], [0, 0, 1]])


def _correlation_onto(src: LocalFeatures, dst: LocalFeatures, warp: np.ndarray) -> float:
    import cv2

    h, w = dst.thumb.shape
    img = src.thumb.astype(np.float32)
    moved = cv2.warpAffine(img, warp, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    inside = cv2.warpAffine(np.ones_like(img), warp, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    mask = inside > 0.999  # fully inside: no border blended in
    if mask.sum() < 64:
        return 0.0
    x, y = moved[mask], dst.thumb.astype(np.float32)[mask]
    x, y = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 1e-3 * mask.sum() else 0.0


def aligned_correlation(a: LocalFeatures, b: LocalFeatures, model: np.ndarray) -> float:
    """Pearson correlation of the two thumbnails over their overlap, aligned by ``model`` (a → b).

    A copy shows the same pixels where it overlaps its original (up to contrast and a little blur),
    so this is near 1; two shots of one scene that share a wall or a background, enough for many
    inliers, differ where the subject moved or changed.  Each image is mapped onto the other and
    the better view counts (the sharper thumbnail as target suits a crop either way); 0 when the
    overlap is too small to say."""
    m = np.vstack([model, [0, 0, 1]])
    if a.mirror:  # the model maps mirrored points (x → −x); the thumbnail is the image as is
        m = m @ np.diag([-1.0, 1.0, 1.0])
    a_to_b = _to_thumb(b) @ m @ np.linalg.inv(_to_thumb(a))
    return max(_correlation_onto(a, b, a_to_b[:2]), _correlation_onto(b, a, np.linalg.inv(a_to_b)[:2]))


def chance_inliers(min_inliers: int | None) -> int:
    """Chance level of shared inliers: 8, or ``min_inliers`` if lower.  Fewer get no pixel check
    (correlation 0: no setting links or calibrates on them) and refute a cosine link
    (:meth:`PairScores.refuted`) — not ``min_inliers`` itself, which calibration raises high where
    candidates share much by chance (many overlapping crops of a few photos) while a cosine link
    with that many inliers is no less a copy."""
    return min(MIN_INLIERS_FLOOR, min_inliers or MIN_INLIERS_FLOOR)


def match(a: LocalFeatures, b: LocalFeatures, cfg: VerifyConfig, root_a: np.ndarray | None = None,
          root_b: np.ndarray | None = None) -> tuple[int, float]:
    """(inliers, aligned correlation) of the best similarity transform from ``a`` (as is or mirrored) onto ``b``;
    the correlation is 0 under :func:`chance_inliers`.  ``root_*``: :func:`root_sift` of
    ``a`` / ``b`` when the caller keeps them (an image takes part in many pairs)."""
    best, model, side = 0, None, a
    root_a = root_sift(a) if root_a is None else root_a
    root_b = root_sift(b) if root_b is None else root_b
    # the mirror's descriptors are a column permutation, and so are their RootSIFT rows (exact: the
    # uint8 sums are exact in float32 whatever the order)
    mirror_points = a.points * np.float32([-1.0, 1.0])  # as LocalFeatures.mirrored(), built only if it wins
    for mirrored, points, root in ((False, a.points, root_a), (True, mirror_points, root_a[:, _MIRROR_BINS])):
        n, m = _fit(points, b.points, cfg, root, root_b)
        if n > best:
            best, model, side = n, m, a.mirrored() if mirrored else a
    if model is None or best < chance_inliers(cfg.min_inliers):
        return best, 0.0
    return best, aligned_correlation(side, b, model)


class PairScores(NamedTuple):
    inliers: np.ndarray  # int32 per pair
    correlation: np.ndarray  # float32 per pair (aligned_correlation; 0 without a model)
    keypoints: np.ndarray  # int32 per pair: the fewer of the two images' keypoints (0 if unreadable)

    def linked(self, cfg: VerifyConfig) -> np.ndarray:
        """Pairs verified as copies: enough inliers and pixels that agree once aligned (both set: the
        stages check before they verify anything)."""
        return (self.inliers >= cfg.min_inliers) & (self.correlation >= cfg.min_correlation)

    def refuted(self, cfg: VerifyConfig) -> np.ndarray:
        """Pairs geometry says are not copies: both images rich in keypoints (``refute_keypoints``),
        fewer than :func:`chance_inliers` shared.  A copy keeps its keypoints under re-encoding,
        rescaling, colour changes and crops; an image too plain or too blurred to have many is never
        refuted."""
        return ((cfg.refute_keypoints > 0) & (self.keypoints >= cfg.refute_keypoints)
                & (self.inliers < chance_inliers(cfg.min_inliers)))


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
