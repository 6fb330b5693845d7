"""Copy-detection whitening fitted on the pool (``dedup.whitening`` / ``decontaminate.whitening``).

Pooled features of photos of one kind share a few strong directions (for Lite0 on 100-px hand
photos, distinct photos reach cosine 0.94–0.98), so a near copy is no closer to its original than
another photo is.  PCA whitening removes the shared mean, rotates onto the principal axes and
scales every axis to unit variance, so the cosine is taken along the directions in which photos
actually differ.

The fit (:func:`fit_pca`) uses a seeded sample of the pool's own unit vectors: mean, covariance
(float64), eigendecomposition, the ``dim`` largest axes.  A sample covariance underestimates the
small eigenvalues (with fewer samples than dimensions many are 0), and dividing by their square
root would blow noise up into the cosine; the eigenvalues are therefore shrunk toward their mean,
``(1 - shrinkage)·λ + shrinkage·mean(λ)`` (Ledoit–Wolf-style shrinkage toward a scaled identity),
before ``1/√λ`` is applied.  ``shrinkage`` 1 is a plain PCA projection, 0 full whitening.

:class:`Whitener` maps raw rows → unit L2 rows of the whitened space, row by row in fixed-size
float64 blocks, so a row's output never depends on which other rows share its block: the
gathered and sharded stages (and a rerun) see bit-identical vectors.  It is stored once per
(embedder, settings, pool) at ``layout.whitening`` and reused; dedup, decontamination (pool and
evaluation vectors) and their calibration (planted copies) apply the pool's fit.  Retrieval keeps
the raw embeddings.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from curation import layout
from curation.choices import Whitening, coerce
from curation.store import EmbeddingStore, normalize_rows
from dinov2.utils.io import atomic_write_bytes

log = logging.getLogger(__name__)

BLOCK = 256  # rows per float64 product (padded): a row's result is independent of its neighbours
FIT_CHUNK = 4096


@dataclass
class WhiteningConfig:
    kind: Whitening = Whitening.none  # pca: whiten the copy-detection cosine (see this module)
    dim: int = 256  # output dimensions (at most the embedding dimension and the sample size - 1)
    shrinkage: float = 0.25  # eigenvalues shrunk toward their mean: (1 - s)·λ + s·mean(λ)
    n_sample: int = 50_000  # pool rows the fit uses (all when fewer)
    seed: int = 0

    def validate(self, prefix: str = "whitening") -> None:
        from dinov2.utils.config import ConfigError

        self.kind = coerce(Whitening, self.kind, f"{prefix}.kind")
        if self.dim < 1 or self.n_sample < 2:
            raise ConfigError(f"key '{prefix}': dim must be >= 1 and n_sample >= 2")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise ConfigError(f"key '{prefix}.shrinkage': must be in [0, 1], got {self.shrinkage}")


class Whitener:
    """``(x - mean) @ proj`` then unit L2, applied to raw rows (see the module doc)."""

    def __init__(self, mean: np.ndarray, proj: np.ndarray, eigenvalues: np.ndarray, key: str = "",
                 path: Path | None = None):
        self.mean = np.ascontiguousarray(mean, dtype=np.float64)
        self.proj = np.ascontiguousarray(proj, dtype=np.float64)
        self.eigenvalues = np.asarray(eigenvalues, dtype=np.float64)
        self.key = key
        self.path = path
        self.in_dim, self.dim = (int(d) for d in self.proj.shape)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        x = normalize_rows(raw)  # the unwhitened stages' vectors, then the pool's whitening
        if x.shape[1] != self.in_dim:
            raise ValueError(f"whitening fitted on {self.in_dim}-d vectors, got {x.shape[1]}-d")
        out = np.zeros((len(x), self.dim), np.float32)
        pad = np.zeros((BLOCK, self.in_dim), np.float64)
        for s in range(0, len(x), BLOCK):
            m = min(BLOCK, len(x) - s)
            pad[:m] = x[s : s + m]
            pad[m:] = self.mean  # padding rows whiten to 0 and are dropped
            out[s : s + m] = ((pad - self.mean) @ self.proj)[:m]
        out[~np.any(x != 0, axis=1)] = 0  # zero rows stay zero, as in normalize_rows
        return normalize_rows(out)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, proj=self.proj, eigenvalues=self.eigenvalues, key=np.array(self.key))
        return buf.getvalue()

    @classmethod
    def load(cls, path: str | Path) -> Whitener:
        with np.load(path, allow_pickle=False) as z:
            w = cls(z["mean"], z["proj"], z["eigenvalues"], str(z["key"]), Path(path))
        if w.mean.shape != (w.in_dim,) or w.eigenvalues.shape != (w.dim,) or not np.isfinite(w.proj).all():
            raise ValueError("inconsistent arrays")
        return w


def fit_pca(x: np.ndarray, dim: int, shrinkage: float) -> Whitener:
    """PCA whitening of the unit rows of ``x`` with shrunk eigenvalues (pure; float64 throughout)."""
    x = normalize_rows(x)
    n, d = x.shape
    if n < 2:
        raise ValueError("whitening needs at least 2 vectors to fit")
    mean = np.zeros(d, np.float64)
    for s in range(0, n, FIT_CHUNK):
        mean += x[s : s + FIT_CHUNK].astype(np.float64).sum(0)
    mean /= n
    cov = np.zeros((d, d), np.float64)
    for s in range(0, n, FIT_CHUNK):
        c = x[s : s + FIT_CHUNK].astype(np.float64) - mean
        cov += c.T @ c
    cov /= n - 1
    cov = (cov + cov.T) / 2
    lam, vec = np.linalg.eigh(cov)
    order = np.argsort(-lam, kind="stable")
    lam, vec = np.clip(lam[order], 0.0, None), vec[:, order]
    vec *= np.where(vec[np.argmax(np.abs(vec), axis=0), np.arange(d)] < 0, -1.0, 1.0)  # a fixed sign per axis
    k = max(1, min(dim, d, n - 1))
    target = float(lam.mean())  # trace / d: the scaled identity the eigenvalues shrink toward
    shrunk = (1.0 - shrinkage) * lam[:k] + shrinkage * target
    shrunk = np.maximum(shrunk, 1e-12 * max(float(lam[0]), 1e-30))
    return Whitener(mean, vec[:, :k] / np.sqrt(shrunk), lam[:k])


def _key(cfg: WhiteningConfig, embedder: str, store: EmbeddingStore) -> str:
    shards = [p.name for p in store.vectors.paths]
    return json.dumps({"whitening": asdict(cfg), "embedder": embedder, "shards": shards,
                       "counts": [int(c) for c in store.vectors.counts]}, sort_keys=True, default=str)


def pool_whitener(out_dir: str | Path, embedder: str, cfg: WhiteningConfig | None) -> Whitener | None:
    """The stage's whitening: None for ``kind: none``; else the stored fit, fitted first if missing.

    The artifact is keyed by the settings, the embedder and the pool's shards, so a rerun loads it
    instead of fitting again, and a changed pool or setting gets a fit of its own.
    """
    if cfg is None or cfg.kind == Whitening.none:
        return None
    pool = EmbeddingStore(out_dir, layout.POOL, embedder)
    if pool.n < 2:
        log.info("whitening skipped: %d pool vectors", pool.n)
        return None
    key = _key(cfg, embedder, pool)
    path = layout.whitening(out_dir, embedder, hashlib.sha256(key.encode()).hexdigest()[:12])
    if path.is_file():
        try:
            w = Whitener.load(path)
            if w.key == key:
                return w
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("refitting the whitening: stored %s unreadable (%s)", path, exc)
    rng = np.random.default_rng([cfg.seed, 11])
    rows = np.sort(rng.choice(pool.n, size=min(pool.n, cfg.n_sample), replace=False))
    w = fit_pca(pool.vectors.gather(rows), cfg.dim, cfg.shrinkage)
    w.key, w.path = key, path
    atomic_write_bytes(path, w.to_bytes())
    log.info("fitted %d-d whitening on %d pool vectors of '%s' (shrinkage %.2f): %s",
             w.dim, len(rows), embedder, cfg.shrinkage, path)
    return w
