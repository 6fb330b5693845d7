"""Calibrating geometric verification's ``min_inliers`` with the same planted copies as the cosine.

A stage with ``verify.enabled`` links a pair by cosine >= threshold, or else (partner among the
image's ``candidates`` nearest neighbours, cosine >= ``min_similarity``) by enough RANSAC inliers
(curation/verify.py).  ``min_inliers`` is the smallest count whose estimated precision meets
``calibrate.target_precision``:

- **Recall** per family: planted copies (calibrate.planted_similarities) against their originals,
  with the candidate test run on the stage's index exactly as the stage runs it; a copy counts
  as found when its cosine clears the threshold or its inliers reach the count.
- **Observed**: for a sample of ``calibrate.n_verify_background`` pool images, the best inlier
  count over their candidates (known copies — sha256, perceptual hash — and cosine-linked pairs
  aside): O(m) images reach m.
- **Chance**: the same images against their *next* ``candidates`` neighbours (ranks
  candidates+1 … 2·candidates): photos of the same kind that are almost never copies of the
  image (a copy sits at the top of its original's list).  Decontamination also pairs sampled
  evaluation images with their own nearest evaluation images (an evaluation set holds almost no
  copies of itself, so these are chance pairs at the very ranks candidates come from; in a small
  evaluation set the next ranks are far less alike than the top ones) and takes the higher rate.  Their best inlier count gives the
  chance rate F0(m) (scaled by the ratio of the observed and chance medians, as the next ranks
  are a little less alike than the candidates; outliers past the bulk set aside as possible
  copies; an exponential tail past the bulk: :func:`chance_rate`), and precision(m) = 1 - N·F0(m) / O(m) with N the sampled images.

Unlike the cosine, inlier counts of copies vary with texture far more than between families, so
the cosine's copy-count estimator (real copies ≈ planted copies) does not transfer; chance
matches, on the other hand, stay few for every photo, which is what this estimate leans on.
What it can get wrong: the nearest non-copies (bursts of one scene) share more features than the
next ranks, so the chance rate is a little low near the top; the count is never below
``MIN_INLIERS_FLOOR``.
"""
from __future__ import annotations

import numpy as np

from curation.verify import VerifyConfig, count_inliers, extract

MIN_INLIERS_FLOOR = 8
NOT_A_CANDIDATE = -1


class CopyInliers:
    """``on_chunk`` hook of calibrate.planted_similarities: inliers of each copy vs its original.

    ``NOT_A_CANDIDATE`` where the stage would never verify the pair (original not among the
    copy's nearest ``candidates`` in ``index``, or cosine under ``min_similarity``)."""

    def __init__(self, originals: list, original_rows: np.ndarray, index, cfg: VerifyConfig, features_of=None):
        """``features_of(i, image)``: features of original ``i`` (default: extracted here, once)."""
        self.originals, self.rows, self.index, self.cfg = originals, np.asarray(original_rows), index, cfg
        self._features: dict[int, object] = {}
        self.features_of = features_of or (lambda i, image: extract(image, cfg))
        self.families: list[str] = []
        self.cosines: list[float] = []
        self.inliers: list[int] = []

    def __call__(self, families, origs, copies, embeddings: np.ndarray, cosines: np.ndarray) -> None:
        _, nbrs = self.index.search(np.ascontiguousarray(embeddings, np.float32), self.cfg.candidates)
        for j, (fam, o, copy) in enumerate(zip(families, origs, copies)):
            seen = self.rows[o] in nbrs[j] and cosines[j] >= self.cfg.min_similarity
            n = NOT_A_CANDIDATE
            if seen:
                if o not in self._features:
                    self._features[o] = self.features_of(o, self.originals[o])
                n = count_inliers(extract(copy, self.cfg), self._features[o], self.cfg)
            self.families.append(fam)
            self.cosines.append(float(cosines[j]))
            self.inliers.append(n)

    def per_family(self, threshold: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(linked by the cosine threshold, inlier counts) per family."""
        cos, inl, fams = np.asarray(self.cosines), np.asarray(self.inliers), np.asarray(self.families)
        names = dict.fromkeys(self.families)
        return {f: cos[fams == f] >= threshold for f in names}, {f: inl[fams == f] for f in names}


def background_inliers(rows: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, linked: np.ndarray, threshold: float,
                       cfg: VerifyConfig, n_sample: int, seed: int, verify_fn, same_source: bool
                       ) -> tuple[np.ndarray, np.ndarray, int]:
    """(best inliers over each sampled row's candidates, best over its next ranks, pairs verified).

    ``rows``/``sims``/``nbrs``/``linked``: calibrate.background_neighbours with at least
    2·candidates neighbours (self and known copies are ``linked``); ``verify_fn(rows, neighbours)``
    counts inliers, ``same_source`` when rows and neighbours index one source.  Rows linked by
    cosine or without any candidate are left out; -1 where a row has no pair in a tier."""
    pick = np.sort(np.random.default_rng([seed, 11]).choice(len(rows), size=min(n_sample, len(rows)), replace=False))
    sims, nbrs, linked, rows = sims[pick], nbrs[pick], linked[pick], rows[pick]
    not_self = nbrs != rows[:, None] if same_source else np.ones(nbrs.shape, bool)
    rank = np.cumsum(not_self, axis=1)  # position among the neighbours that are not the image itself
    usable = not_self & ~linked
    tier1 = usable & (rank <= cfg.candidates)
    tier2 = usable & (rank > cfg.candidates) & (rank <= 2 * cfg.candidates)
    keep = tier1.any(1) & ~(tier1 & (sims >= threshold)).any(1)
    eligible = (sims >= cfg.min_similarity) & (sims < threshold) & keep[:, None]
    qi, ci = np.nonzero((tier1 | tier2) & eligible)
    inliers = verify_fn(rows[qi], nbrs[qi, ci]) if len(qi) else np.zeros(0, np.int32)
    best = np.full((2, len(rows)), -1)
    np.maximum.at(best, (tier2[qi, ci].astype(np.int64), qi), inliers)
    return best[0][keep], best[1][keep], len(qi)


def chance_rate(chance: np.ndarray, grid: np.ndarray, set_aside: bool = True) -> np.ndarray:
    """Share of non-copy pairs reaching each count of ``grid``, from best chance counts ``chance``.

    With ``set_aside`` (next-rank pairs: a copy whose original sits past rank ``candidates``
    lands there), counts past the bulk's fence q90 + 3·(q90 - q50) are set aside as possible
    copies; past q90 an exponential tail fitted on the bulk (median → q90) keeps the rate from
    dropping to zero just above the largest count seen."""
    if not len(chance):
        return np.zeros(len(grid))
    q50, q90 = np.quantile(chance, [0.5, 0.9])
    c = chance[chance <= q90 + 3 * (q90 - q50)] if set_aside else chance
    empirical = (c[None, :] >= grid[:, None]).sum(1) / len(chance)
    scale = max((q90 - q50) / np.log(5.0), 1.0)
    tail = 0.1 * np.exp(-(grid - q90) / scale)
    return np.where(grid > q90, np.maximum(empirical, tail), empirical)


def fit_min_inliers(copy_found: dict[str, np.ndarray], copy_inliers: dict[str, np.ndarray], observed: np.ndarray,
                    chances: list[tuple[np.ndarray, bool]], target_precision: float) -> dict:
    """``min_inliers`` and its estimates (see the module doc).

    ``copy_found``: per family, copies already linked by cosine; ``copy_inliers``: their counts
    (-1 where verification would not see the pair); ``chances``: (best chance counts, whether
    outliers are set aside as possible copies) per source — pool next ranks (yes), and for
    decontamination eval → eval top ranks (no); the higher rate counts."""
    observed = np.asarray(observed)
    chances = [(np.asarray(c)[np.asarray(c) >= 0], aside) for c, aside in chances]
    chance = np.concatenate([c for c, _ in chances]) if chances else np.zeros(0)
    n = len(observed)
    warnings: list[str] = []
    grid = np.arange(MIN_INLIERS_FLOOR, 1001)
    o = (observed[None, :] >= grid[:, None]).sum(1)
    f0 = np.zeros(len(grid))
    for c, aside in chances:
        if aside and len(c) and len(observed):
            # next ranks are a little less alike than the candidates themselves: scale their counts
            # by the ratio of the medians (both medians are non-copies while copies are a minority)
            c = c * max(1.0, float(np.median(observed)) / max(float(np.median(c)), 1.0))
        f0 = np.maximum(f0, chance_rate(c, grid, aside))
    precision = np.where(o > 0, 1.0 - np.minimum(n * f0, o) / np.maximum(o, 1), 1.0)
    ok = precision >= target_precision
    tail = np.flip(np.cumsum(np.flip(ok)) / np.arange(1, len(ok) + 1)) >= 0.95  # larger counts meet it too
    i = int(np.argmax(ok & tail)) if (ok & tail).any() else len(grid) - 1
    if not (ok & tail).any():
        warnings.append("no inlier count reaches the target precision: verification links nothing here")
    m = int(grid[i])
    per_family = {f: round(float(np.mean(copy_found[f] | (copy_inliers[f] >= m))), 4) for f in copy_found}
    weak = [f for f, r in per_family.items() if r < 0.9]
    if weak:
        warnings.append(f"estimated recall with verification below 0.9 for {', '.join(weak)} (the perceptual "
                        "hash, phash_max_distance, covers blur and heavy re-encodes)")
    left = np.concatenate([copy_inliers[f][~copy_found[f]] for f in copy_found]) if copy_found else np.zeros(0)
    if len(left) and np.mean(left >= m) < 0.5:  # of the copies the cosine misses, verification finds few
        warnings.append(f"verification links little here (min_inliers {m}): images beyond the candidates share as "
                        "many features as copies do (e.g. many overlapping crops of a few photos)")
    if min((len(c) for c, _ in chances), default=0) < 50:
        warnings.append("fewer than 50 chance pairs measured: the precision estimate is rough")
    return {
        "min_inliers": m,
        "estimated_precision": round(float(precision[i]), 4),
        "estimated_recall": round(float(np.mean(list(per_family.values()))), 4),
        "estimated_recall_per_family": per_family,
        "background_above": int(o[i]),
        "chance_quantiles": ({q: float(np.quantile(chance, float(q))) for q in ("0.5", "0.99", "1.0")}
                             if len(chance) else {}),
        "warnings": warnings,
    }
