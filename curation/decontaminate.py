"""Relative deduplication against evaluation sets (DINOv2 §3: threshold 0.45, whole component).

Every ok pool image is compared with every image of the ``eval-<name>`` sources
(the eval embeddings are indexed — exact Flat below 1e5 images — and the pool is
streamed through it shard by shard, so memory stays bounded by the eval set).
A pool image is contaminated when its best cosine to an eval image is ≥
``threshold`` — or, with ``verify.enabled``, when one of its nearest eval images under the
threshold passes geometric verification (curation/verify.py), and a best cosine over the
threshold counts only if verification does not refute the pair (``verify.refute_keypoints``); the WHOLE dedup component of a contaminated image is dropped
(``via_component``), because its near-copies carry the same eval content.

Output ``OUT/decontaminate/decisions.parquet`` (one row per ok pool image):
``id, contaminated, eval_set, eval_id, eval_sim, via_component``.  ``eval_sim`` is
the image's own best similarity to any eval image (NaN without eval sets);
``eval_set``/``eval_id`` name the eval image that caused the drop (the image's own
match, or for ``via_component`` rows the best match inside its component), null
when clean.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from curation import layout
from curation.index import IndexConfig, build_index
from curation.pair_verifier import StoredPairVerifier
from curation.store import EmbeddingStore, Vectors, as_vectors, list_sources, resolve_embedder
from curation.verify import VerifyConfig, candidate_pairs
from curation.whiten import WhiteningConfig, pool_whitener
from dinov2.utils.io import atomic_write_json, atomic_write_parquet

log = logging.getLogger(__name__)


@dataclass
class DecontamConfig:
    embedder: str = ""  # "" = the only embedder present for the pool
    threshold: float | None = None  # cosine >= threshold → contaminated (DINOv2/SSCD: 0.45); null = calibrated
    k: int = 1  # eval neighbours looked up per pool image (only the best one decides)
    index: IndexConfig = field(default_factory=IndexConfig)
    whitening: WhiteningConfig = field(default_factory=WhiteningConfig)  # pca: fitted on the POOL, applied to both
    verify: VerifyConfig = field(default_factory=VerifyConfig)  # geometric verification of near misses

    def validate(self) -> None:
        from dinov2.utils.config import ConfigError

        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"decontaminate.threshold must be a cosine in [-1, 1], got {self.threshold}")
        if self.k < 1:
            raise ConfigError("decontaminate.k must be >= 1")
        self.index.validate()
        self.whitening.validate("decontaminate.whitening")
        self.verify.validate("decontaminate.verify")


@dataclass
class DecontamResult:
    contaminated: np.ndarray  # bool per pool row
    via_component: np.ndarray  # bool: dropped only because a component-mate matched
    eval_row: np.ndarray  # eval row that caused the drop (-1 when clean)
    best_eval_row: np.ndarray  # own best eval match (-1 when none)
    best_eval_sim: np.ndarray  # own best cosine (NaN when no eval images)
    stats: dict


def best_matches(pool: Vectors | np.ndarray, evals: Vectors | np.ndarray, cfg: DecontamConfig,
                 row0: int = 0, candidates: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(best eval row, its cosine) per pool row (-1 / NaN without eval images).

    ``pool`` may be one block of the pool's shards (the sharded stage's tasks): it is searched in
    the same per-shard batches as the whole pool, so each row's match is bit-identical.
    ``candidates``: a list that receives (pool rows, eval rows) pairs to verify (``cfg.verify``).
    """
    pool, evals = as_vectors(pool), as_vectors(evals)
    n = pool.n
    best_row = np.full(n, -1, np.int64)
    best_sim = np.full(n, np.nan, np.float32)
    if evals.n and n:
        if evals.dim != pool.dim:
            raise ValueError(f"pool ({pool.dim}-d) and eval ({evals.dim}-d) embeddings differ in dimension")
        index = build_index(evals, cfg.index)
        k = max(1, cfg.k, cfg.verify.candidates if candidates is not None else 1)
        for qrows, sims, nbrs in index.search_vectors(pool, min(k, evals.n), desc="decontaminate"):
            best_row[qrows] = nbrs[:, 0]
            best_sim[qrows] = np.where(nbrs[:, 0] >= 0, sims[:, 0], np.nan)
            if candidates is not None:
                candidates.append(candidate_pairs(qrows, sims, nbrs, cfg.threshold, cfg.verify, self_search=False))
    return best_row, best_sim


def decontaminate_core(pool: Vectors | np.ndarray, evals: Vectors | np.ndarray, cfg: DecontamConfig,
                       component: np.ndarray | None = None,
                       matches: tuple[np.ndarray, np.ndarray] | None = None, verify_fn=None) -> DecontamResult:
    """Match pool rows against eval rows; spread contamination over ``component`` labels.

    ``matches``: :func:`best_matches` already computed (the sharded stage's map tasks).
    ``verify_fn(pool_rows, eval_rows) -> inliers``: geometric verification (``cfg.verify``).
    """
    pool, evals = as_vectors(pool), as_vectors(evals)
    n = pool.n
    if evals.n and n and cfg.threshold is None:
        raise ValueError("decontaminate.threshold is unset: give one, or let curation.calibrate choose it")
    verifying = cfg.verify.enabled and evals.n > 0 and n > 0
    if verifying and (matches is not None or verify_fn is None or cfg.verify.min_inliers is None
                      or cfg.verify.min_correlation is None):
        raise ValueError("decontaminate.verify needs the gathered search, a verification function, min_inliers and "
                         "min_correlation")
    cands: list | None = [] if verifying else None
    best_row, best_sim = matches if matches is not None else best_matches(pool, evals, cfg, candidates=cands)
    own = np.nan_to_num(best_sim, nan=-np.inf) >= (cfg.threshold if cfg.threshold is not None else np.inf)
    eval_row = np.where(own, best_row, -1)
    stats: dict = {}
    if verifying:
        t0 = time.perf_counter()
        if cfg.verify.refute_keypoints > 0:  # a cosine match geometry refutes is no match
            rows = np.flatnonzero(own)
            refuted = rows[verify_fn(rows, best_row[rows]).refuted(cfg.verify)]
            own[refuted], eval_row[refuted] = False, -1
            stats.update(refute_checked=len(rows), refuted=len(refuted))
        qa = np.concatenate([c[0] for c in cands]) if cands else np.zeros(0, np.int64)
        eb = np.concatenate([c[1] for c in cands]) if cands else np.zeros(0, np.int64)
        open_ = ~own[qa]
        qa, eb = qa[open_], eb[open_]
        scores = verify_fn(qa, eb)
        inliers, ok = scores.inliers, scores.linked(cfg.verify)
        # per pool row, the verified eval image with the most inliers explains the drop
        order = np.lexsort((eb[ok], -inliers[ok], qa[ok]))
        rows, first = np.unique(qa[ok][order], return_index=True)
        own[rows] = True
        eval_row[rows] = eb[ok][order][first]
        stats.update(verify_pairs=len(qa), verified=len(rows), verify_s=round(time.perf_counter() - t0, 3))
    contaminated = own.copy()
    if component is not None and own.any():
        component = np.asarray(component, np.int64)
        if len(component) != n:
            raise ValueError("component labels must have one entry per pool row")
        comp_df = pd.DataFrame({"c": component[own], "sim": best_sim[own], "e": best_row[own]})
        # the strongest match inside each contaminated component explains its mates' drop
        strongest = comp_df.sort_values(["c", "sim", "e"], ascending=[True, False, True]).drop_duplicates("c")
        by_comp = pd.Series(strongest["e"].to_numpy(), index=strongest["c"].to_numpy())
        in_bad = np.isin(component, strongest["c"].to_numpy())
        contaminated |= in_bad
        via = in_bad & ~own
        eval_row[via] = by_comp.reindex(component[via]).to_numpy(dtype=np.int64)
    via_component = contaminated & ~own
    stats.update(n=n, n_eval=evals.n, contaminated=int(contaminated.sum()), direct=int(own.sum()),
                 via_component=int(via_component.sum()))
    return DecontamResult(contaminated, via_component, eval_row, best_row, best_sim, stats)


def decisions_path(out_dir: str | Path) -> Path:
    return layout.decontaminate_decisions(out_dir)


def run_decontaminate(out_dir: str | Path, cfg: DecontamConfig | None = None, *, overwrite: bool = False,
                      matches_fn=None, max_pixels: int | None = None) -> Path:
    """Stage 3: pool vs ``eval-*`` embeddings + dedup components → decisions parquet.

    ``matches_fn(pool_store) -> (best eval row, cosine)``: matches computed elsewhere (the sharded
    stage's reduce reads its map tasks' outputs).
    """
    cfg = cfg or DecontamConfig()
    out = decisions_path(out_dir)
    if out.exists() and not overwrite:
        log.info("decontamination already done: %s", out)
        return out
    embedder = resolve_embedder(out_dir, layout.POOL, cfg.embedder)
    whitener = pool_whitener(out_dir, embedder, cfg.whitening)
    pool = EmbeddingStore(out_dir, layout.POOL, embedder, whitener)
    eval_sources = list_sources(out_dir, layout.EVAL_PREFIX)
    evals = EmbeddingStore(out_dir, eval_sources, embedder, whitener) if eval_sources else None
    component = None
    dedup_file = layout.dedup_decisions(out_dir)
    if dedup_file.exists():
        dd = pq.read_table(dedup_file, columns=["id", "component"]).to_pandas()
        comp = pd.Series(dd["component"].to_numpy(), index=dd["id"].to_numpy())
        mapped = comp.reindex(pool.ids)
        # ids missing from dedup (should not happen) become singleton components
        component = np.where(mapped.isna(), -1 - np.arange(pool.n), mapped.fillna(0)).astype(np.int64)
    else:
        log.warning("no dedup decisions at %s: decontaminating images individually", dedup_file)
    verify_fn = None
    if evals is not None:
        matches = matches_fn(pool) if matches_fn is not None else None
        verify_fn = StoredPairVerifier(out_dir, layout.POOL, pool.ids, cfg.verify, max_pixels,
                                         layout.EVAL_PREFIX, evals.ids) if cfg.verify.enabled else None
        res = decontaminate_core(pool.vectors, evals.vectors, cfg, component, matches, verify_fn)
        eval_ids = evals.ids
        eval_sets = evals.meta["source"].astype(str).str.removeprefix("eval-").to_numpy(dtype=object)
    else:
        res = decontaminate_core(pool.vectors, np.zeros((0, max(pool.dim, 1)), np.float32), cfg, component)
        eval_ids = eval_sets = np.zeros(0, dtype=object)

    def names(arr, rows):
        return [arr[r] if r >= 0 else None for r in rows.tolist()]

    table = pa.table({
        "id": pa.array(pool.ids.tolist(), pa.string()),
        "contaminated": pa.array(res.contaminated, pa.bool_()),
        "eval_set": pa.array(names(eval_sets, res.eval_row), pa.string()),
        "eval_id": pa.array(names(eval_ids, res.eval_row), pa.string()),
        "eval_sim": pa.array(res.best_eval_sim, pa.float32()),
        "via_component": pa.array(res.via_component, pa.bool_()),
    })
    stats = dict(res.stats, embedder=embedder, eval_sources=eval_sources, threshold=cfg.threshold,
                 whitening=whitener.path.name if whitener else None,
                 shard_problems=[vars(p) for p in pool.problems + (evals.problems if evals else [])])
    if verify_fn is not None:
        stats.update(verify_images_read=verify_fn.images_read, verify_unreadable=len(verify_fn.unreadable),
                     verify_min_inliers=cfg.verify.min_inliers, verify_min_correlation=cfg.verify.min_correlation)
    atomic_write_json(layout.stats_path(out), stats)
    atomic_write_parquet(out, table)
    log.info("decontamination: %d of %d pool images contaminated", res.stats["contaminated"], pool.n)
    return out
