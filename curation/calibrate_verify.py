"""Calibrating geometric verification's ``min_correlation`` and ``min_inliers`` with the same planted
copies as the cosine.

A stage with ``verify.enabled`` links a pair by cosine >= threshold, or else (partner among the
image's ``candidates`` nearest neighbours, cosine >= ``min_similarity``) by enough RANSAC inliers
whose aligned pixels agree (curation/verify.py).  For each ``min_correlation`` on a grid (a pair
under it counts 0 inliers), ``min_inliers`` is the smallest count whose estimated precision meets
``calibrate.target_precision``; the pair of values with the highest estimated recall wins
(:func:`fit_verification`).  For one correlation:

- **Recall** per family: planted copies (calibrate.planted_similarities) against their originals,
  with the candidate test run on the stage's index exactly as the stage runs it; a copy counts
  as found when its cosine clears the threshold (and verification does not refute the pair:
  ``refute_keypoints``) or its inliers reach the count.
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
  copies; an exponential tail past the bulk: :func:`chance_rate`), times the share of chance
  pairs with many inliers whose correlation reaches the one tried (:func:`correlation_tail`);
  precision(m) = 1 - N·F0(m) / O(m) with N the sampled images.
- **Copies among the candidates** (:func:`copy_count_precision`): a second estimate that needs no
  chance model — the copies among the sampled rows are counted where only copies agree
  (correlation >= 0.95) and divided by the planted copies' recall there; precision(m, c) =
  C(m)·R(m, c) / O(m, c).  The lower of the two estimates counts.  It catches what the chance
  tail misses on dense crawls: other shots of one session among the candidates with 10–30
  inliers and a correlation of 0.85–0.94 (bench/RESULTS.md).

Unlike the cosine, inlier counts of copies vary with texture far more than between families, so
the cosine's copy-count estimator (real copies ≈ planted copies) does not transfer; chance
matches, on the other hand, stay few for every photo, which is what this estimate leans on.
What it can get wrong: the nearest non-copies (bursts of one scene) share more features than the
next ranks, so the chance rate is a little low near the top (for the correlation too: other
shots of one scene among the candidates agree more than those at the next ranks); the count is
never below ``MIN_INLIERS_FLOOR``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from curation import layout
from curation.pair_verifier import StoredPairVerifier, extract_many
from curation.verify import MIN_INLIERS_FLOOR, PairScores, VerifyConfig, chance_inliers, extract, match

NOT_A_CANDIDATE = -1
NEVER_REFUTED = 1 << 30  # inlier count standing for "verification cannot refute this cosine link"
INLIER_GRID = np.arange(MIN_INLIERS_FLOOR, 1001)
# aligned correlations that, with the inliers, only copies reach (measured: other shots of one
# scene stay under 0.95, planted copies' median is 0.997): where the copies among the candidates are counted
ANCHOR_CORRELATIONS = (0.95, 0.96, 0.97, 0.98)


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
        self.correlations: list[float] = []
        self.keypoints: list[int] = []  # the fewer of copy's and original's (0: not verified)

    def __call__(self, families, origs, copies, embeddings: np.ndarray, cosines: np.ndarray) -> None:
        _, nbrs = self.index.search(np.ascontiguousarray(embeddings, np.float32), self.cfg.candidates)
        seen = [self.rows[o] in nbrs[j] and cosines[j] >= self.cfg.min_similarity for j, o in enumerate(origs)]
        # the copies' features on every core; the originals' come through the stage's shared cache
        copy_features = iter(extract_many(lambda image: image, [c for c, s in zip(copies, seen) if s], self.cfg))
        for j, (fam, o) in enumerate(zip(families, origs)):
            n, corr, kp = NOT_A_CANDIDATE, 0.0, 0
            if seen[j]:
                if o not in self._features:
                    self._features[o] = self.features_of(o, self.originals[o])
                feats = next(copy_features)[0]
                n, corr = match(feats, self._features[o], self.cfg)
                kp = min(len(feats.points), len(self._features[o].points))
            self.families.append(fam)
            self.cosines.append(float(cosines[j]))
            self.inliers.append(n)
            self.correlations.append(corr)
            self.keypoints.append(kp)

    def per_family(self, threshold: float) -> tuple[dict[str, np.ndarray], ...]:
        """(linked by the cosine threshold, inlier counts, aligned correlations, inliers of the cosine
        links verification may refute — the others ``NEVER_REFUTED``) per family."""
        cos, inl, fams = np.asarray(self.cosines), np.asarray(self.inliers), np.asarray(self.families)
        corr = np.asarray(self.correlations, np.float32)
        refutable = (self.cfg.refute_keypoints > 0) & (np.asarray(self.keypoints) >= self.cfg.refute_keypoints)
        cos_inl = np.where(refutable & (cos >= threshold), inl, NEVER_REFUTED)
        names = dict.fromkeys(self.families)
        return ({f: cos[fams == f] >= threshold for f in names}, {f: inl[fams == f] for f in names},
                {f: corr[fams == f] for f in names}, {f: cos_inl[fams == f] for f in names})


@dataclass
class BackgroundPairs:
    """Verified pairs of sampled rows with their candidates (tier 0) and next ranks (tier 1)."""

    row: np.ndarray  # index into the kept sampled rows
    tier: np.ndarray
    scores: PairScores
    n_rows: int

    def best(self, min_correlation: float) -> tuple[np.ndarray, np.ndarray]:
        """Best inliers per row over its candidates, over its next ranks (-1: no pair), a pair whose
        aligned correlation is under ``min_correlation`` counting 0 (the stage would not link it)."""
        counts = np.where(self.scores.correlation >= min_correlation, self.scores.inliers, 0)
        best = np.full((2, self.n_rows), -1)
        np.maximum.at(best, (self.tier, self.row), counts)
        return best[0], best[1]

    def correlations(self, tier: int, min_inliers: int = 0) -> np.ndarray:
        """Aligned correlations of the pairs of ``tier`` with at least ``min_inliers`` inliers."""
        return self.scores.correlation[(self.tier == tier) & (self.scores.inliers >= min_inliers)]


def background_pairs(rows: np.ndarray, sims: np.ndarray, nbrs: np.ndarray, linked: np.ndarray, threshold: float,
                     cfg: VerifyConfig, n_sample: int, seed: int, verify_fn, same_source: bool) -> BackgroundPairs:
    """Pairs of ``n_sample`` sampled rows with their candidates and next ranks, verified.

    ``rows``/``sims``/``nbrs``/``linked``: calibrate.background_neighbours with at least
    2·candidates neighbours (self and known copies are ``linked``); ``verify_fn(rows, neighbours)``
    scores pairs, ``same_source`` when rows and neighbours index one source.  Rows linked by
    cosine or without any candidate are left out."""
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
    scores = verify_fn(rows[qi], nbrs[qi, ci])
    kept_index = np.cumsum(keep) - 1  # rows left out have no eligible pair
    return BackgroundPairs(kept_index[qi], tier2[qi, ci].astype(np.int64), scores, int(keep.sum()))


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
                    chances: list[tuple[np.ndarray, bool]], target_precision: float, fixed: int | None = None,
                    chance_scale: float = 1.0, copy_cosine_inliers: dict[str, np.ndarray] | None = None,
                    copy_precision: np.ndarray | None = None) -> dict:
    """``min_inliers`` and its estimates (see the module doc).

    ``copy_found``: per family, copies already linked by cosine; ``copy_inliers``: their counts
    (-1 where verification would not see the pair); ``chances``: (best chance counts, whether
    outliers are set aside as possible copies) per source — pool next ranks (yes), and for
    decontamination eval → eval top ranks (no); the higher rate counts.  ``fixed``: an explicit
    count, whose estimates are reported instead.  ``chance_scale``: the share of chance pairs
    that would pass the correlation check as well (:func:`correlation_tail`).  ``copy_cosine_inliers``:
    per family, the inliers of cosine-linked copies that verification may refute (``NEVER_REFUTED``
    for the others); such a copy stays found only if they reach 8 (or the count, if lower).  ``copy_precision``: a
    second estimate per count of ``INLIER_GRID`` (:func:`copy_count_precision`); the lower counts."""
    observed = np.asarray(observed)
    chances = [(np.asarray(c)[np.asarray(c) >= 0], aside) for c, aside in chances]
    chance = np.concatenate([c for c, _ in chances]) if chances else np.zeros(0)
    n = len(observed)
    warnings: list[str] = []
    grid = INLIER_GRID
    o = (observed[None, :] >= grid[:, None]).sum(1)
    f0 = np.zeros(len(grid))
    for c, aside in chances:
        if aside and len(c) and len(observed):
            # next ranks are a little less alike than the candidates themselves: scale their counts
            # by the ratio of the medians (both medians are non-copies while copies are a minority)
            c = c * max(1.0, float(np.median(observed)) / max(float(np.median(c)), 1.0))
        f0 = np.maximum(f0, chance_rate(c, grid, aside))
    f0 = f0 * chance_scale
    precision = np.where(o > 0, 1.0 - np.minimum(n * f0, o) / np.maximum(o, 1), 1.0)
    if copy_precision is not None:
        precision = np.minimum(precision, copy_precision)
    ok = precision >= target_precision
    tail = np.flip(np.cumsum(np.flip(ok)) / np.arange(1, len(ok) + 1)) >= 0.95  # larger counts meet it too
    i = int(np.argmax(ok & tail)) if (ok & tail).any() else len(grid) - 1
    if fixed is not None:
        i = int(np.clip(fixed - grid[0], 0, len(grid) - 1))
    elif not (ok & tail).any():
        warnings.append("no inlier count reaches the target precision: verification links nothing here")
    m = int(grid[i]) if fixed is None else int(fixed)
    refute_below = chance_inliers(m)  # what the stage will refute at this count
    kept = {f: copy_found[f] & ((copy_cosine_inliers or {}).get(f, NEVER_REFUTED) >= refute_below)
            for f in copy_found}
    per_family = {f: round(float(np.mean(kept[f] | (copy_inliers[f] >= m))), 4) for f in copy_found}
    weak = [f for f, r in per_family.items() if r < 0.9]
    if weak:
        warnings.append(f"estimated recall with verification below 0.9 for {', '.join(weak)} (the perceptual "
                        "hash, phash_max_distance, covers blur and heavy re-encodes)")
    refuted = {f: int((copy_found[f] & ~kept[f]).sum()) for f in copy_found}
    n_found = sum(int(v.sum()) for v in copy_found.values())
    if sum(refuted.values()) > max(1, 0.02 * n_found):
        warnings.append(f"verification would refute {sum(refuted.values())} of {n_found} copies the cosine links "
                        f"({', '.join(f for f, k in refuted.items() if k)}): raise verify.refute_keypoints, or 0 "
                        "keeps every cosine link")
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
        "copies_refuted": int(sum(refuted.values())),
        "chance_quantiles": ({q: float(np.quantile(chance, float(q))) for q in ("0.5", "0.99", "1.0")}
                             if len(chance) else {}),
        "warnings": warnings,
    }


def _verified_share(left_inliers: np.ndarray, left_corr: np.ndarray, c: float) -> np.ndarray:
    """R(m, c): share of the planted copies the cosine left that verification finds, per count of the grid."""
    g = np.where(left_corr >= c, left_inliers, -1)
    return (g[None, :] >= INLIER_GRID[:, None]).mean(1) if len(g) else np.zeros(len(INLIER_GRID))


def _rows_linked(bg: BackgroundPairs, c: float) -> np.ndarray:
    """O(m, c): sampled rows whose best candidate reaches each count of the grid at correlation ``c``."""
    return (bg.best(c)[0][None, :] >= INLIER_GRID[:, None]).sum(1)


def copies_in_sample(left_inliers: np.ndarray, left_corr: np.ndarray, bg: BackgroundPairs) -> np.ndarray:
    """C(m): copies among the sampled rows per count of the grid, counted where only copies agree
    (median over ``ANCHOR_CORRELATIONS`` of O(m, a) / R(m, a); NaN where no anchor has R >= 0.25)."""
    anchors = []
    for a in ANCHOR_CORRELATIONS:
        r = _verified_share(left_inliers, left_corr, a)
        anchors.append(np.where(r >= 0.25, _rows_linked(bg, a) / np.maximum(r, 1e-9), np.nan))
    stacked = np.stack(anchors)
    valid = np.isfinite(stacked).any(0)
    copies = np.full(len(INLIER_GRID), np.nan)
    copies[valid] = np.nanmedian(stacked[:, valid], 0)
    return copies


def copy_count_precision(copies: np.ndarray, left_inliers: np.ndarray, left_corr: np.ndarray,
                         bg: BackgroundPairs, min_correlation: float) -> np.ndarray:
    """Precision per count of ``INLIER_GRID`` at ``min_correlation``, from the candidates themselves.

    The sampled rows that verification links, O(m, c), are copies plus rows whose candidates only
    look alike (other shots of one scene).  Where pixels agree almost perfectly (``ANCHOR_CORRELATIONS``)
    only copies remain, so the copies among the sampled rows are C(m) = O(m, a) / R(m, a), with R
    the share of planted copies the cosine left to verification that it finds (the cosine
    calibration's estimator, made two-dimensional; median over the anchors).  Precision is then
    C(m)·R(m, c) / O(m, c).  Unlike the chance-pair tail it needs no model of how much more alike
    the candidates are than the next ranks; it needs copies in the sample, and does not veto on
    fewer than two rows in excess.  ``copies``: :func:`copies_in_sample` (the same for every
    correlation tried)."""
    o, r = _rows_linked(bg, min_correlation), _verified_share(left_inliers, left_corr, min_correlation)
    expected = copies * r
    veto = np.isfinite(copies) & (o > 0) & (o - expected >= 2)
    return np.where(veto, np.clip(expected / np.maximum(o, 1), 0.0, 1.0), 1.0)


def correlation_tail(chance_correlation: np.ndarray, candidate_correlation: np.ndarray | None = None):
    """``tail(c)``: the share of chance pairs (with many inliers) whose aligned correlation reaches ``c``.

    Fisher's z = atanh(r) of the chance correlations is taken as normal, located and scaled by
    its median and interquartile range (robust to the few real copies among chance pairs), so
    the tail beyond the largest value seen is still estimated.  Candidates agree a little more
    than the next ranks even when they are not copies: with ``candidate_correlation`` (the
    candidates' own pairs, copies among them) the location moves up by how much their lower
    quartile exceeds the chance pairs' (copies sit above it).  None with fewer than 10 values."""
    from math import erfc, sqrt

    def z_of(r):
        return np.arctanh(np.clip(np.asarray(r, np.float64), -0.999, 0.999))

    if len(chance_correlation) < 10:
        return None
    z = z_of(chance_correlation)
    q25, mu, q75 = np.quantile(z, [0.25, 0.5, 0.75])
    sigma = max((q75 - q25) / 1.349, 0.02)
    if candidate_correlation is not None and len(candidate_correlation) >= 10:
        mu += max(0.0, float(np.quantile(z_of(candidate_correlation), 0.25)) - q25)
    return lambda c: 0.5 * erfc((float(z_of(c)) - mu) / (sigma * sqrt(2.0)))


def fit_verification(found: dict[str, np.ndarray], counts: dict[str, np.ndarray], corrs: dict[str, np.ndarray],
                     pool_bg: BackgroundPairs, eval_bg: BackgroundPairs | None, target_precision: float,
                     min_inliers: int | None = None, min_correlation: float | None = None,
                     cosine_inliers: dict[str, np.ndarray] | None = None) -> dict:
    """``min_correlation`` and ``min_inliers`` together: the pair with the highest estimated recall
    whose estimated precision meets the target (explicit values are kept, the other one fitted).

    For each correlation ``c`` on a grid: copies and observed best counts count only pairs whose
    pixels agree (correlation >= c); the chance rate of a count is the rate without the check
    times the share of chance pairs that pass it (:func:`correlation_tail`, as if the two were
    independent: the count says how much of the scene is shared, the correlation whether the
    rest of it matches too)."""
    chance_corr = [pool_bg.correlations(1, MIN_INLIERS_FLOOR)]
    if eval_bg is not None:  # every eval → eval pair is a chance pair
        chance_corr.append(eval_bg.scores.correlation[eval_bg.scores.inliers >= MIN_INLIERS_FLOOR])
    chance_corr = np.concatenate(chance_corr)
    tail = correlation_tail(chance_corr, pool_bg.correlations(0, MIN_INLIERS_FLOOR))
    chances = [(pool_bg.best(-1.0)[1], True)]
    if eval_bg is not None:
        chances.append((eval_bg.best(-1.0)[0], False))
    grid = [float(min_correlation)] if min_correlation is not None else np.round(np.arange(0.5, 0.991, 0.01), 2)
    left_inliers = np.concatenate([counts[f][~found[f]] for f in counts]) if counts else np.zeros(0)
    left_corr = np.concatenate([corrs[f][~found[f]] for f in counts]) if counts else np.zeros(0)
    copies = copies_in_sample(left_inliers, left_corr, pool_bg)
    fits = []
    for c in grid:
        gated = {f: np.where(corrs[f] >= c, counts[f], np.minimum(counts[f], 0)) for f in counts}
        fit = fit_min_inliers(found, gated, pool_bg.best(c)[0], chances, target_precision, fixed=min_inliers,
                              chance_scale=tail(c) if tail is not None else 1.0, copy_cosine_inliers=cosine_inliers,
                              copy_precision=copy_count_precision(copies, left_inliers, left_corr, pool_bg, c))
        fits.append(((fit["estimated_precision"] >= target_precision, fit["estimated_recall"]),
                     dict(fit, min_correlation=float(c))))
    # meets the target, then recall; of equal ones the middle correlation (a margin on both sides)
    top = max(key for key, _ in fits)
    tied = [fit for key, fit in fits if key == top]
    best = tied[len(tied) // 2]
    if tail is None:
        best["warnings"].append("fewer than 10 chance pairs with many inliers: the correlation check's effect on "
                                "precision is not estimated")
    best["chance_correlation_quantiles"] = ({q: round(float(np.quantile(chance_corr, float(q))), 4)
                                             for q in ("0.5", "0.9", "1.0")} if len(chance_corr) else {})
    best["chance_pairs_with_many_inliers"] = len(chance_corr)
    return best


def calibrate_verification(out_dir, stage: str, vcfg: VerifyConfig, cal, pool, ref, hook: CopyInliers,
                           neighbours: tuple, eval_neighbours, threshold: float, max_pixels: int | None
                           ) -> tuple[dict, dict]:
    """``(record, fit inputs)`` of a stage's geometric verification: ``min_correlation`` and
    ``min_inliers`` from copies, observed and chance pairs (module doc, :func:`fit_verification`).

    ``neighbours``: calibrate.background_neighbours of the pool against ``ref``;
    ``eval_neighbours()``: those of the evaluation images among themselves (decontamination), or
    None.  Explicit ``min_inliers`` / ``min_correlation`` win; their estimates are reported."""
    t0 = time.perf_counter()
    found, counts, corrs, cosine_inliers = hook.per_family(threshold)
    pairs = StoredPairVerifier(out_dir, layout.POOL, pool.ids, vcfg, max_pixels,
                               *((layout.EVAL_PREFIX, ref.ids) if stage != "dedup" else ()))
    pool_bg = background_pairs(*neighbours, threshold, vcfg, cal.n_verify_background, cal.seed, pairs,
                               stage == "dedup")
    eval_bg = None
    if eval_neighbours is not None:
        # evaluation sets hold (almost) no copies of their own images: their images' nearest
        # evaluation neighbours are chance pairs at the very ranks candidates come from
        evals = StoredPairVerifier(out_dir, layout.EVAL_PREFIX, ref.ids, vcfg, max_pixels)
        eval_bg = background_pairs(*eval_neighbours(), threshold, vcfg, cal.n_verify_background, cal.seed, evals, True)
    fit = fit_verification(found, counts, corrs, pool_bg, eval_bg, cal.target_precision, vcfg.min_inliers,
                           vcfg.min_correlation, cosine_inliers)
    copy_corr = np.asarray(hook.correlations)[np.asarray(hook.inliers) >= MIN_INLIERS_FLOOR]
    rec = dict(fit, min_inliers_source="config" if vcfg.min_inliers is not None else "calibrated",
               min_correlation_source="config" if vcfg.min_correlation is not None else "calibrated",
               copy_correlation_quantiles=({q: round(float(np.quantile(copy_corr, float(q))), 4)
                                            for q in ("0.01", "0.05", "0.5")} if len(copy_corr) else {}),
               n_background=pool_bg.n_rows,
               pairs_verified=len(pool_bg.row) + (len(eval_bg.row) if eval_bg is not None else 0),
               copies_not_candidates=int(sum(n == NOT_A_CANDIDATE for n in hook.inliers)),
               seconds=round(time.perf_counter() - t0, 2))
    inputs = {"verify_pairs_row": pool_bg.row, "verify_pairs_tier": pool_bg.tier,
              "verify_pairs_inliers": pool_bg.scores.inliers, "verify_pairs_correlation": pool_bg.scores.correlation,
              "verify_copy_inliers": np.asarray(hook.inliers), "verify_copy_correlations": np.asarray(hook.correlations),
              "verify_copy_cosines": np.asarray(hook.cosines), "verify_copy_families": np.asarray(hook.families),
              "verify_copy_keypoints": np.asarray(hook.keypoints)}
    return rec, inputs
