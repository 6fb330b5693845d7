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
3. **Mixture.** The background is a mixture of non-copies and real copies the
   crawl already holds; random "non-copies" that are in fact duplicates must not
   be counted as false positives.  So the background is fitted (EM, in Fisher-z
   space) as ``(1-π)·Gumbel + π·copies``, the copy component's shape taken from
   the planted copies: best-match maxima of non-copies follow an extreme-value
   law, while the real duplicates are absorbed by the copy component.
4. **Threshold.** The smallest cosine whose estimated precision
   ``π·R(t) / (π·R(t) + (1-π)·(1-G(t)))`` meets ``target_precision`` (and stays
   above it for every higher cosine), π floored at ``min_copy_share``.

What the estimate can get wrong (also in docs/curation.md): real copies made by
operations unlike the planted ones (paste-ins, heavy overlays) count as non-copies
and push the threshold up (lower recall, precision kept); a non-copy tail heavier
than the Gumbel fit (bursts of near-identical distinct photos) makes the estimated
precision optimistic; with very few copies in the crawl π is uncertain, hence the
floor.  Per-family recalls are measured on ~n_copies/9 copies each.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from curation.plant import FAMILIES, plant_copy
from dinov2.utils.io import atomic_write_json, read_range

log = logging.getLogger(__name__)

_Z_CLIP = 0.99995


@dataclass
class CalibrateConfig:
    """Used by every stage whose ``threshold`` is null; an explicit threshold always wins."""

    target_precision: float = 0.95  # estimated precision the chosen threshold must reach
    n_copies: int = 0  # synthetic copies planted per stage (spread over the families); 0 = 5 % of the pool, 108..900
    n_background: int = 20_000  # images whose best match is modelled (all when fewer)
    min_copy_share: float = 0.005  # floor for the estimated share of copies (see module doc)
    seed: int = 0

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        if not 0.5 <= self.target_precision < 1.0:
            raise ConfigError(f"calibrate.target_precision must be in [0.5, 1), got {self.target_precision}")
        if (self.n_copies and self.n_copies < len(FAMILIES)) or self.n_background < 10:
            raise ConfigError(f"calibrate.n_copies must be 0 (auto) or >= {len(FAMILIES)}, n_background >= 10")
        if not 0.0 < self.min_copy_share < 0.5:
            raise ConfigError("calibrate.min_copy_share must be in (0, 0.5)")


# ----------------------------------------------------------------------------- statistics
def _z(s: np.ndarray) -> np.ndarray:
    return np.arctanh(np.clip(np.asarray(s, np.float64), -_Z_CLIP, _Z_CLIP))


def _kde(points: np.ndarray, weights: np.ndarray):
    w = weights / weights.sum()
    mean = float((w * points).sum())
    sd = math.sqrt(max(float((w * (points - mean) ** 2).sum()), 1e-8))
    bw = max(1.06 * sd * len(points) ** -0.2, 0.02)  # Silverman; floor keeps it smooth

    def pdf(x: np.ndarray) -> np.ndarray:
        d = (x[:, None] - points[None, :]) / bw
        return (np.exp(-0.5 * d * d) * w[None, :]).sum(1) / (bw * math.sqrt(2 * math.pi))

    return pdf


def _gumbel_fit(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    w = w / max(w.sum(), 1e-12)
    mean = float((w * x).sum())
    var = float((w * (x - mean) ** 2).sum())
    beta = max(math.sqrt(6 * max(var, 1e-10)) / math.pi, 1e-4)
    return mean - 0.5772156649 * beta, beta


def _gumbel_pdf(x, mu, beta):
    u = (x - mu) / beta
    return np.exp(-u - np.exp(-np.clip(u, -50, 50))) / beta


def _gumbel_sf(x, mu, beta):
    return -np.expm1(-np.exp(-np.clip((x - mu) / beta, -50, 50)))


def fit_threshold(copy_sims: dict[str, np.ndarray], background: np.ndarray, target_precision: float,
                  min_copy_share: float = 0.005) -> dict:
    """Threshold + estimates from planted-copy similarities per family and the background maxima."""
    fams = [f for f, s in copy_sims.items() if len(s)]
    if not fams or len(background) < 10:
        raise ValueError("calibration needs planted copies and at least 10 background similarities")
    cz = np.concatenate([_z(copy_sims[f]) for f in fams])
    cw = np.concatenate([np.full(len(copy_sims[f]), 1.0 / len(copy_sims[f])) for f in fams])
    g1 = _kde(cz, cw)
    bz = _z(background)
    pi = 0.05
    mu, beta = _gumbel_fit(bz, np.ones(len(bz)))
    p1 = g1(bz)
    for _ in range(200):
        p0 = _gumbel_pdf(bz, mu, beta)
        r = pi * p1 / np.maximum(pi * p1 + (1 - pi) * p0, 1e-300)
        new_pi = float(np.clip(r.mean(), 1e-4, 0.5))
        mu, beta = _gumbel_fit(bz, 1 - r)
        if abs(new_pi - pi) < 1e-6:
            pi = new_pi
            break
        pi = new_pi
    pi_used = max(pi, min_copy_share)
    grid = np.round(np.arange(0.0, 0.9995, 0.001), 3)
    gz = _z(grid)
    all_sorted = {f: np.sort(_z(copy_sims[f])) for f in fams}

    def recall_at(zt: np.ndarray, f: str) -> np.ndarray:
        s = all_sorted[f]
        return 1.0 - np.searchsorted(s, zt, side="left") / len(s)

    recall = np.mean([recall_at(gz, f) for f in fams], axis=0)  # families weighted equally
    fp = (1 - pi_used) * _gumbel_sf(gz, mu, beta)
    tp = pi_used * recall
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 0.0)
    # smallest cosine from which the estimated precision stays at or above the target
    # above the largest planted similarity the recall is 0 and the precision meaningless
    ok = (precision >= target_precision) | (recall <= 0)
    tail_ok = np.flip(np.cumprod(np.flip(ok)).astype(bool))
    warnings = []
    if tail_ok.any() and recall[int(np.argmax(tail_ok))] > 0:
        i = int(np.argmax(tail_ok))
    else:
        i = int(np.argmax(np.where(recall > 0, precision, -1)))
        warnings.append(f"no threshold reaches the target precision {target_precision:.2f} "
                        f"(best estimate {precision[i]:.2f}): the embedder barely separates copies "
                        "from distinct images here")
    t = float(grid[i])
    per_family = {f: round(float(recall_at(gz[i : i + 1], f)[0]), 4) for f in fams}
    weak = [f for f, r in per_family.items() if r < 0.9]
    if weak:
        warnings.append(f"estimated recall below 0.9 for {', '.join(weak)}: a crop/flip-robust descriptor "
                        "(embedders.<name>.descriptor: flip | regions) or a copy-detection model may help")
    if pi > 0.4:
        warnings.append(f"{100 * pi:.0f} % of the sampled images look like copies: the estimate is less reliable")
    return {
        "threshold": round(t, 3),
        "estimated_precision": round(float(precision[i]), 4),
        "estimated_recall": round(float(recall[i]), 4),
        "estimated_recall_per_family": per_family,
        "estimated_copy_share": round(pi, 4),
        "copy_share_used": round(pi_used, 4),
        "non_copy_model": {"law": "gumbel(fisher-z of best-match cosine)", "mu": round(mu, 4), "beta": round(beta, 4)},
        "background_quantiles": {q: round(float(np.quantile(background, float(q))), 4)
                                 for q in ("0.5", "0.9", "0.99")},
        "copy_quantile_05": {f: round(float(np.quantile(copy_sims[f], 0.05)), 4) for f in fams},
        "warnings": warnings,
    }


# ----------------------------------------------------------------------------- images
def _locations(out_dir: Path, source_prefix: str) -> pd.DataFrame:
    cols = ["id", "status", "input_path", "byte_offset", "byte_size"]
    parts = []
    for folder in sorted((out_dir / "embed").glob(f"{source_prefix}*")):
        for f in sorted(folder.glob("s*.parquet")):
            try:
                parts.append(pq.read_table(f, columns=cols).to_pandas())
            except Exception:  # noqa: BLE001 - a bad shard is reported by the store already
                continue
    if not parts:
        return pd.DataFrame(columns=cols)
    df = pd.concat(parts, ignore_index=True)
    return df[df["status"] == "ok"].set_index("id")


def _load_images(locs: pd.DataFrame, ids: list[str], max_pixels: int):
    from dinov2.data.decode import DecodeError, decode_image

    out = []
    for i in ids:
        if i not in locs.index:
            continue
        row = locs.loc[i]
        try:
            off = row["byte_offset"]
            size = row["byte_size"]
            data = read_range(row["input_path"], int(off) if pd.notna(off) else -1,
                              int(size) if pd.notna(size) else -1)
            out.append((i, decode_image(data, max_pixels=max_pixels).image))
        except (OSError, DecodeError, ValueError):  # moved input or odd member: skip the sample
            continue
    return out


def planted_similarities(embedder, originals, original_vectors: np.ndarray, n_copies: int,
                         rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Plant ``n_copies`` copies (families round-robin over the originals) and return cosine per family."""
    import torch

    jobs = []
    for c in range(n_copies):
        o = c % len(originals)
        fam = FAMILIES[c % len(FAMILIES)]
        copy, _ = plant_copy(rng, originals[o], fam)
        jobs.append((fam, o, embedder.preprocess(copy)))
    sims: dict[str, list[float]] = {f: [] for f in FAMILIES}
    bs = embedder.cfg.batch_size
    for s in range(0, len(jobs), bs):
        chunk = jobs[s : s + bs]
        emb = embedder.embed(torch.stack([t for _, _, t in chunk]))
        ref = original_vectors[[o for _, o, _ in chunk]].astype(np.float32)
        for (fam, _, _), v in zip(chunk, (emb * ref).sum(1)):
            sims[fam].append(float(v))
    return {f: np.asarray(v, np.float32) for f, v in sims.items() if v}


def background_similarities(pool, ref, stage: str, cal: CalibrateConfig, stage_cfg, phash_max_distance: int,
                            k: int = 8) -> np.ndarray:
    """Best cosine of sampled pool images to ``ref`` (other pool images / eval images), known copies aside."""
    from curation.dedup import hamming64
    from curation.index import build_index

    rng = np.random.default_rng([cal.seed, 7])
    rows = np.sort(rng.choice(pool.n, size=min(pool.n, cal.n_background), replace=False))
    index = build_index(ref.vectors, stage_cfg.index)
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
    best = np.where(linked, -np.inf, sims).max(1)
    return best[np.isfinite(best)].astype(np.float32)


# ----------------------------------------------------------------------------- stage entry
def calibration_path(out_dir: str | Path, stage: str) -> Path:
    return Path(out_dir) / "calibrate" / f"{stage}.json"


def calibrate_stage(cfg, stage: str) -> float:
    """The threshold ``stage`` (dedup | decontaminate) uses: explicit, else calibrated (cached)."""
    stage_cfg = getattr(cfg, stage)
    out = calibration_path(cfg.output_dir, stage)
    if stage_cfg.threshold is not None:
        atomic_write_json(out, {"stage": stage, "threshold": float(stage_cfg.threshold), "source": "config"})
        return float(stage_cfg.threshold)
    cal: CalibrateConfig = cfg.calibrate
    # reuse a record only when made with the same calibration, embedder and stage settings
    from curation.embed import load_embedder
    from curation.store import EmbeddingStore, list_sources, resolve_embedder

    name = resolve_embedder(cfg.output_dir, "pool", stage_cfg.embedder)
    key = json.dumps({"calibrate": asdict(cal), "embedder": asdict(cfg.embedders[name]), "stage": asdict(stage_cfg)},
                     sort_keys=True, default=str)
    if out.is_file():
        rec = json.loads(out.read_text())
        if rec.get("source") == "calibrated" and rec.get("key") == key:
            return float(rec["threshold"])
    t0 = time.perf_counter()
    pool = EmbeddingStore(cfg.output_dir, "pool", name)
    ref_sources = ["pool"] if stage == "dedup" else list_sources(cfg.output_dir, "eval-")
    if not ref_sources or pool.n < 2:
        log.info("calibration of %s skipped: nothing to compare", stage)
        atomic_write_json(out, {"stage": stage, "threshold": 1.0, "source": "calibrated", "skipped": True,
                                "key": key})
        return 1.0
    ref = pool if stage == "dedup" else EmbeddingStore(cfg.output_dir, ref_sources, name)
    rng = np.random.default_rng([cal.seed, len(stage)])
    n_copies = cal.n_copies or int(np.clip(round(0.05 * pool.n), 12 * len(FAMILIES), 100 * len(FAMILIES)))
    n_orig = min(ref.n, max(len(FAMILIES), n_copies // 3))
    pick = np.sort(rng.choice(ref.n, size=n_orig, replace=False))
    prefix = "pool" if stage == "dedup" else "eval-"
    images = _load_images(_locations(Path(cfg.output_dir), prefix), [ref.ids[p] for p in pick],
                          cfg.embed.max_pixels)
    if not images:
        raise RuntimeError(f"calibration of {stage}: none of the sampled images could be read again")
    kept = {i for i, _ in images}
    pick = np.array([p for p in pick if ref.ids[p] in kept])
    embedder = load_embedder(cfg.embedders[name])
    t_embed = time.perf_counter()
    copies = planted_similarities(embedder, [im for _, im in images], ref.vectors.gather(pick),
                                  n_copies, rng)
    t_embed = time.perf_counter() - t_embed
    background = background_similarities(pool, ref, stage, cal, stage_cfg, getattr(cfg.dedup, "phash_max_distance", 4))
    rec = fit_threshold(copies, background, cal.target_precision, cal.min_copy_share)
    rec.update(stage=stage, source="calibrated", embedder=name, descriptor=cfg.embedders[name].descriptor,
               target_precision=cal.target_precision, n_originals=len(pick),
               n_copies=int(sum(len(v) for v in copies.values())), n_background=len(background),
               seconds=round(time.perf_counter() - t0, 2), embed_seconds=round(t_embed, 2),
               config=asdict(cal), key=key)
    for w in rec["warnings"]:
        log.warning("calibration of %s: %s", stage, w)
    atomic_write_json(out, rec)
    log.info("calibrated %s threshold %.3f (estimated precision %.3f, recall %.3f)", stage, rec["threshold"],
             rec["estimated_precision"], rec["estimated_recall"])
    return float(rec["threshold"])


def resolved(cfg, stage: str):
    """``cfg.<stage>`` with its threshold filled in (explicit or calibrated)."""
    import dataclasses

    return dataclasses.replace(getattr(cfg, stage), threshold=calibrate_stage(cfg, stage))


def read_calibration(out_dir: str | Path) -> dict:
    """``{stage: record}`` of the calibration records present (for summary.json and the report)."""
    out = {}
    for stage in ("dedup", "decontaminate"):
        p = calibration_path(out_dir, stage)
        if p.is_file():
            rec = json.loads(p.read_text())
            for k in ("config", "key", "seconds", "embed_seconds"):  # summary.json stays a function of the data
                rec.pop(k, None)
            out[stage] = rec
    return out
