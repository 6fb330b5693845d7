"""Self-calibrating copy-detection thresholds (dedup and decontamination) from planted copies.

A cosine threshold means something different for every embedder and crawl (raw
Lite0 features of distinct photos sit at 0.8–0.9, SSCD's at 0.1–0.4).  When a
stage's ``threshold`` is left unset (null), this module picks it from the data:

1. **Copies.** A random sample of the images themselves (pool images for dedup,
   evaluation images for decontamination) is decoded again and turned into
   synthetic copies (curation/plant.py: crops of 50–95 % of the area, flips,
   rescales, re-encodes, colour changes, small rotations, borders, overlays and
   combinations), embedded with the stage's embedder, and compared with the
   original's stored vector → the copy-similarity distribution per family.
2. **Background.** For a sample of pool images, the best similarity to any other
   pool image (dedup) or to any evaluation image (decontamination), ignoring
   partners already linked by sha256 or perceptual hash (known copies).
3. **Copies already in the crawl.**  The background mixes non-copies with real copies, so it is
   not used as "negatives" (a real duplicate would count as a false positive).  Instead the
   number of copies it holds is estimated where only copies clear the cosine: if O(t) background
   images clear t and planted copies clear it with recall R(t), the background holds about
   C = O(t)/R(t) copies.  For each t, C is the median of that estimate over every t' >= t.
4. **Threshold.**  Estimated precision P(t) = C·R(t) / O(t); the threshold is the smallest
   cosine with P(t) >= ``target_precision`` above which (nearly) every cosine meets it too.

What the estimate can get wrong (also in docs/curation.md): the crawl's real copies may be
harder than the planted ones (paste-ins, heavy crops on small photos): C is then underestimated
and the threshold goes up (recall drops, precision holds); if they are easier, C and P(t) are
overestimated near the threshold (measured: about two points of precision).  Distinct images
that are near-identical (bursts, templates) look like copies to any threshold.  With very few
copies the counts are thin: cosines cleared by fewer than 20 background images do not veto a
threshold, and C is floored at ``min_copy_share``.  Per-family recalls are measured on
~n_copies/9 copies each.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curation import layout
from curation.calibrate_verify import MIN_INLIERS_FLOOR, CopyInliers, calibrate_verification
from curation.pair_verifier import image_features
from curation.plant import FAMILIES, plant_copy
from curation.reread import ImageReader
from dinov2.utils.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

SMALL_BACKGROUND = 500  # fewer background images: conservative copy-count estimate (see fit_threshold)

@dataclass
class CalibrateConfig:
    """Used by every stage whose ``threshold`` is null; an explicit threshold always wins."""

    target_precision: float = 0.95  # estimated precision the chosen threshold must reach
    n_copies: int = 0  # synthetic copies planted per stage (spread over the families); 0 = 5 % of the pool, 108..900
    n_background: int = 20_000  # images whose best match is modelled (all when fewer)
    n_verify_background: int = 300  # of those, images whose candidates are verified (<stage>.verify)
    min_copy_share: float = 0.005  # floor for the estimated share of copies (see module doc)
    seed: int = 0

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        if not 0.5 <= self.target_precision < 1.0:
            raise ConfigError(f"calibrate.target_precision must be in [0.5, 1), got {self.target_precision}")
        if (self.n_copies and self.n_copies < len(FAMILIES)) or self.n_background < 10 or self.n_verify_background < 10:
            raise ConfigError(f"calibrate.n_copies must be 0 (auto) or >= {len(FAMILIES)}, "
                              "n_background and n_verify_background >= 10")
        if not 0.0 < self.min_copy_share < 0.5:
            raise ConfigError("calibrate.min_copy_share must be in (0, 0.5)")


# ----------------------------------------------------------------------------- statistics
def fit_threshold(copy_sims: dict[str, np.ndarray], background: np.ndarray, target_precision: float,
                  min_copy_share: float = 0.005, min_count: int = 5, weak_hint: str | None = None) -> dict:
    """Threshold + estimates from planted-copy similarities per family and the background maxima."""
    fams = [f for f, s in copy_sims.items() if len(s)]
    if not fams or len(background) < 10:
        raise ValueError("calibration needs planted copies and at least 10 background similarities")
    grid = np.round(np.arange(0.0, 0.9995, 0.001), 3)
    bg = np.sort(np.asarray(background, np.float64))
    n = len(bg)
    all_sorted = {f: np.sort(np.asarray(copy_sims[f], np.float64)) for f in fams}

    def recall_at(t: np.ndarray, f: str) -> np.ndarray:
        s = all_sorted[f]
        return 1.0 - np.searchsorted(s, t, side="left") / len(s)

    recall = np.mean([recall_at(grid, f) for f in fams], axis=0)  # families weighted equally
    observed = n - np.searchsorted(bg, grid, side="left")  # background images with a match >= t
    # Copies in the background: above a threshold t' that (nearly) only copies clear, C = O(t')/R(t').
    # For each t, C is the median of these estimates over t' >= t: it never looks at lower cosines
    # (where non-copies inflate O) and is robust to the noise of the few counts at the very top.
    # Below SMALL_BACKGROUND images the counts are too thin for a median: the minimum (the most
    # conservative estimate) is used, and a warning says so.
    ratio = np.where((observed >= min_count) & (recall > 0), observed / np.maximum(recall, 1e-12), np.nan)
    small = n < SMALL_BACKGROUND
    copies_est = np.full(len(grid), np.inf)
    for i in range(len(grid)):
        above = ratio[i:]
        above = above[np.isfinite(above)]
        if len(above):
            copies_est[i] = float(above.min() if small else np.median(above))
    copies_est = np.maximum(copies_est, min_copy_share * n)
    defined = np.isfinite(copies_est) & (observed >= min_count)
    tp = np.where(defined, np.minimum(np.where(defined, copies_est, 0) * recall, observed), 0)
    precision = np.where(defined, tp / np.maximum(observed, 1), 1.0)
    # smallest cosine that meets the target and above which (nearly) every cosine does too: single
    # grid points may dip from counting noise, and cosines cleared by fewer than 4·min_count
    # background images are too thin to veto a threshold
    ok = (precision >= target_precision) | (recall <= 0) | (observed < min(4 * min_count, 0.2 * n))
    tail_share = np.flip(np.cumsum(np.flip(ok)) / np.arange(1, len(ok) + 1))
    chosen = (precision >= target_precision) & (recall > 0) & (tail_share >= 0.95)
    warnings = [f"only {n} background images: the copy count is estimated conservatively"] if small else []
    if chosen.any():
        i = int(np.argmax(chosen))
    else:
        i = int(np.argmax(np.where(recall > 0, precision, -1)))
        warnings.append(f"no threshold reaches the target precision {target_precision:.2f} "
                        f"(best estimate {precision[i]:.2f}): the embedder barely separates copies "
                        "from distinct images here")
    t = float(grid[i])
    share = float(copies_est[i] / n) if np.isfinite(copies_est[i]) else float("nan")
    per_family = {f: round(float(recall_at(grid[i : i + 1], f)[0]), 4) for f in fams}
    weak = [f for f, r in per_family.items() if r < 0.9]
    if weak:
        warnings.append(f"estimated recall below 0.9 for {', '.join(weak)}: " + (weak_hint or (
            "a crop/flip-robust descriptor (embedders.<name>.descriptor: flip | regions), geometric "
            "verification (<stage>.verify.enabled) or a copy-detection model may help")))
    if np.isfinite(share) and share > 0.4:
        warnings.append(f"{100 * share:.0f} % of the sampled images look like copies: the estimate is less reliable")
    return {
        "threshold": round(t, 3),
        "estimated_precision": round(float(precision[i]), 4),
        "estimated_recall": round(float(recall[i]), 4),
        "estimated_recall_per_family": per_family,
        "estimated_copy_share": round(share, 4) if np.isfinite(share) else None,
        "background_above_threshold": int(observed[i]),
        "background_quantiles": {q: round(float(np.quantile(background, float(q))), 4)
                                 for q in ("0.5", "0.9", "0.99")},
        "copy_quantile_05": {f: round(float(np.quantile(copy_sims[f], 0.05)), 4) for f in fams},
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- copies
def planted_similarities(embedder, originals, original_vectors: np.ndarray, n_copies: int,
                         rng: np.random.Generator, transform=None, on_chunk=None) -> dict[str, np.ndarray]:
    """Plant ``n_copies`` copies (families round-robin over the originals) and return cosine per family.

    ``transform``: the stage's whitening, applied to the copies' embeddings (``original_vectors``
    come from the store through it already).  ``on_chunk(families, originals, copies, embeddings,
    cosines)`` sees every batch of copies (geometric verification's calibration); copies are
    planted one batch at a time, so memory holds one batch of images."""
    import torch

    sims: dict[str, list[float]] = {f: [] for f in FAMILIES}
    bs = embedder.cfg.batch_size
    for s in range(0, n_copies, bs):
        fams, origs, copies = [], [], []
        for c in range(s, min(s + bs, n_copies)):
            origs.append(c % len(originals))
            fams.append(FAMILIES[c % len(FAMILIES)])
            copies.append(plant_copy(rng, originals[origs[-1]], fams[-1])[0])
        emb = embedder.embed(torch.stack([embedder.preprocess(c) for c in copies]))
        if transform is not None:
            emb = transform(emb)
        emb = np.asarray(emb, np.float32)
        cos = (emb * original_vectors[origs].astype(np.float32)).sum(1)
        for fam, v in zip(fams, cos):
            sims[fam].append(float(v))
        if on_chunk is not None:
            on_chunk(fams, origs, copies, emb, cos)
    return {f: np.asarray(v, np.float32) for f, v in sims.items() if v}


def background_neighbours(pool, ref, stage: str, cal: CalibrateConfig, index, phash_max_distance: int,
                          k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sampled pool rows, their ``k`` nearest ``ref`` rows (cosines, rows) and which are known copies.

    Known copies: the row itself (dedup), same sha256 or perceptual hash within distance."""
    from curation.dedup import hamming64

    rng = np.random.default_rng([cal.seed, 7])
    rows = np.sort(rng.choice(pool.n, size=min(pool.n, cal.n_background), replace=False))
    k = min(k + 1, ref.n)
    sims, nbrs = index.search(pool.vectors.gather(rows).astype(np.float32), k)

    def hashes(store):
        ph = pd.to_numeric(store.meta["phash"], errors="coerce")
        return (store.meta["sha256"].astype(object).to_numpy(), ph.fillna(0).astype(np.int64).to_numpy(),
                ph.notna().to_numpy())

    q_sha, q_ph, q_ok = (a[rows] for a in hashes(pool))
    r_sha, r_ph, r_ok = hashes(ref)
    safe = np.maximum(nbrs, 0)
    linked = (nbrs < 0) | ~np.isfinite(sims)
    if stage == "dedup":
        linked |= nbrs == rows[:, None]
    linked |= pd.notna(q_sha)[:, None] & (r_sha[safe] == q_sha[:, None])
    if phash_max_distance >= 0:
        close = hamming64(np.broadcast_to(q_ph[:, None], safe.shape).copy(), r_ph[safe]) <= phash_max_distance
        linked |= close & q_ok[:, None] & r_ok[safe]
    return rows, sims, nbrs, linked


def background_similarities(sims: np.ndarray, linked: np.ndarray) -> np.ndarray:
    """Best cosine per sampled row over its neighbours that are not known copies."""
    best = np.where(linked, -np.inf, sims).max(1)
    return best[np.isfinite(best)].astype(np.float32)


# ----------------------------------------------------------------------------- stage entry
def calibration_path(out_dir: str | Path, stage: str) -> Path:
    return layout.calibration(out_dir, stage)


def calibrate_stage(cfg, stage: str) -> float:
    """The threshold ``stage`` (dedup | decontaminate) uses: explicit, else calibrated (cached)."""
    return float(calibration_record(cfg, stage)["threshold"])


def _verify_needed(stage_cfg) -> bool:
    v = getattr(stage_cfg, "verify", None)
    return bool(v is not None and v.enabled and (v.min_inliers is None or v.min_correlation is None))


def calibration_record(cfg, stage: str) -> dict:
    """The record of what ``stage`` uses: cosine threshold (and ``verify.min_inliers``), explicit or calibrated."""
    stage_cfg = getattr(cfg, stage)
    out = calibration_path(cfg.output_dir, stage)
    if stage_cfg.threshold is not None and not _verify_needed(stage_cfg):
        rec = {"stage": stage, "threshold": float(stage_cfg.threshold), "source": "config"}
        atomic_write_json(out, rec)
        return rec
    cal: CalibrateConfig = cfg.calibrate
    # reuse a record only when made with the same calibration, embedder and stage settings
    from curation.embedders import load_embedder
    from curation.index import build_index
    from curation.store import EmbeddingStore, list_sources, resolve_embedder

    name = resolve_embedder(cfg.output_dir, "pool", stage_cfg.embedder)
    key = json.dumps({"calibrate": asdict(cal), "embedder": asdict(cfg.embedders[name]), "stage": asdict(stage_cfg)},
                     sort_keys=True, default=str)
    if out.is_file():
        rec = json.loads(out.read_text())
        if rec.get("source") == "calibrated" and rec.get("key") == key:
            return rec
    t0 = time.perf_counter()
    from curation.whiten import pool_whitener

    whitener = pool_whitener(cfg.output_dir, name, getattr(stage_cfg, "whitening", None))
    pool = EmbeddingStore(cfg.output_dir, "pool", name, whitener)
    ref_sources = ["pool"] if stage == "dedup" else list_sources(cfg.output_dir, "eval-")
    verifying = _verify_needed(stage_cfg)
    if not ref_sources or pool.n < 2:
        log.info("calibration of %s skipped: nothing to compare", stage)
        rec = {"stage": stage, "threshold": stage_cfg.threshold if stage_cfg.threshold is not None else 1.0,
               "source": "calibrated", "skipped": True, "key": key}
        if verifying:
            rec["verify"] = {"min_inliers": stage_cfg.verify.min_inliers or MIN_INLIERS_FLOOR, "skipped": True,
                             "min_correlation": stage_cfg.verify.min_correlation or 0.0}
        atomic_write_json(out, rec)
        return rec
    ref = pool if stage == "dedup" else EmbeddingStore(cfg.output_dir, ref_sources, name, whitener)
    rng = np.random.default_rng([cal.seed, len(stage)])
    n_copies = cal.n_copies or int(np.clip(round(0.05 * pool.n), 12 * len(FAMILIES), 100 * len(FAMILIES)))
    n_orig = min(ref.n, max(len(FAMILIES), n_copies // 3))
    pick = np.sort(rng.choice(ref.n, size=n_orig, replace=False))
    prefix = "pool" if stage == "dedup" else "eval-"
    reader = ImageReader(cfg.output_dir, prefix, cfg.embed.max_pixels)
    images = reader.load_many([ref.ids[p] for p in pick])
    if not images:
        raise RuntimeError(f"calibration of {stage}: none of the sampled images could be read again")
    kept = {i for i, _ in images}
    pick = np.array([p for p in pick if ref.ids[p] in kept])
    embedder = load_embedder(cfg.embedders[name])
    index = build_index(ref.vectors, stage_cfg.index)
    hook = None
    if verifying:  # the originals' features go into the cache the stage's verification reads
        originals = image_features(cfg.output_dir, prefix, stage_cfg.verify, cfg.embed.max_pixels)
        originals.add_images([i for i, _ in images], [im for _, im in images])
        hook = CopyInliers([im for _, im in images], pick, index, stage_cfg.verify,
                           features_of=lambda i, image: originals.of_image(images[i][0], image))
    t_embed = time.perf_counter()
    copies = planted_similarities(embedder, [im for _, im in images], ref.vectors.gather(pick),
                                  n_copies, rng, whitener, on_chunk=hook)
    t_embed = time.perf_counter() - t_embed
    k = max(8, 2 * stage_cfg.verify.candidates) if verifying else 8
    rows, sims, nbrs, linked = background_neighbours(pool, ref, stage, cal, index,
                                                     getattr(cfg.dedup, "phash_max_distance", 4), k)
    background = background_similarities(sims, linked)
    if stage_cfg.threshold is None:
        rec = fit_threshold(copies, background, cal.target_precision, cal.min_copy_share)
    else:
        rec = {"threshold": float(stage_cfg.threshold), "threshold_source": "config", "warnings": []}
    extra: dict = {}
    if verifying:
        phash = getattr(cfg.dedup, "phash_max_distance", 4)
        eval_neighbours = None if stage == "dedup" else (
            lambda: background_neighbours(ref, ref, "dedup", cal, index, phash, k))
        rec["verify"], extra = calibrate_verification(cfg.output_dir, stage, stage_cfg.verify, cal, pool, ref, hook,
                                                      (rows, sims, nbrs, linked), eval_neighbours, rec["threshold"],
                                                      cfg.embed.max_pixels)
    import io

    buf = io.BytesIO()  # the fit's inputs, for diagnostics
    np.savez(buf, background=background, **{f"copies_{f}": v for f, v in copies.items()}, **extra)
    atomic_write_bytes(out.with_suffix(".npz"), buf.getvalue())
    rec.update(stage=stage, source="calibrated", embedder=name, descriptor=cfg.embedders[name].descriptor,
               whitening=whitener.path.name if whitener is not None else None,
               target_precision=cal.target_precision, n_originals=len(pick),
               n_copies=int(sum(len(v) for v in copies.values())), n_background=len(background),
               seconds=round(time.perf_counter() - t0, 2), embed_seconds=round(t_embed, 2),
               config=asdict(cal), key=key)
    for w in rec["warnings"] + rec.get("verify", {}).get("warnings", []):
        log.warning("calibration of %s: %s", stage, w)
    atomic_write_json(out, rec)
    log.info("calibrated %s threshold %.3f (estimated precision %s, recall %s)%s", stage, rec["threshold"],
             rec.get("estimated_precision"), rec.get("estimated_recall"),
             f"; verify.min_inliers {rec['verify']['min_inliers']}, min_correlation "
             f"{rec['verify']['min_correlation']}" if verifying else "")
    return rec


def resolved(cfg, stage: str):
    """``cfg.<stage>`` with its threshold (and verify.min_inliers / min_correlation) filled in: explicit or
    calibrated."""
    import dataclasses

    stage_cfg = getattr(cfg, stage)
    rec = calibration_record(cfg, stage)
    changes = {"threshold": float(rec["threshold"])}
    if _verify_needed(stage_cfg):
        changes["verify"] = dataclasses.replace(stage_cfg.verify, min_inliers=int(rec["verify"]["min_inliers"]),
                                                min_correlation=float(rec["verify"]["min_correlation"]))
    return dataclasses.replace(stage_cfg, **changes)


def read_calibration(out_dir: str | Path) -> dict:
    """``{stage: record}`` of the calibration records present (for summary.json and the report)."""
    out = {}
    for stage in ("dedup", "decontaminate"):
        p = calibration_path(out_dir, stage)
        if p.is_file():
            rec = json.loads(p.read_text())
            for k in ("config", "key", "seconds", "embed_seconds"):  # summary.json stays a function of the data
                rec.pop(k, None)
            if isinstance(rec.get("verify"), dict):
                rec["verify"].pop("seconds", None)
            out[stage] = rec
    return out
