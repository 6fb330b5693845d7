"""Warnings about a curated output that ran to the end but probably not as the user meant.

They are logged, stored in ``OUT/final/summary.json`` under ``warnings`` and shown in the report:
an evaluation set that held no usable image (decontamination then removed nothing against it), a
query set with no usable image, and retrieval that kept almost everything (no balancing happened)
or nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

# Retrieval keeping at least this share of its candidates did not rebalance anything.
KEEPS_ALMOST_ALL = 0.95


def _usable_images(source_dir: Path) -> int:
    n = 0
    for p in sorted(source_dir.glob("*.parquet")):
        status = pq.read_table(p, columns=["status"]).column("status")
        n += int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    return n


def output_warnings(out_dir: str | Path, funnel: dict[str, int]) -> list[str]:
    """Warnings for a finished output folder (``funnel`` as in summary.json)."""
    out = Path(out_dir)
    warnings: list[str] = []
    embed = out / "embed"
    sources = sorted(p for p in embed.iterdir() if p.is_dir()) if embed.is_dir() else []
    for src in sources:
        kind, _, name = src.name.partition("-")
        if kind in ("eval", "query") and _usable_images(src) == 0:
            what = ("nothing was decontaminated against it" if kind == "eval"
                    else "nothing can be retrieved for it")
            warnings.append(f"{kind} set '{name}' has no usable image: {what}; check its inputs")
    has_queries = any(s.name.startswith("query-") for s in sources)
    candidates, kept = funnel.get("after_decontamination", 0), funnel.get("retrieved", 0)
    if has_queries and candidates > 0:
        share = kept / candidates
        if kept == 0:
            warnings.append(f"retrieval selected nothing of {candidates:,} candidates: the query sets match "
                            f"nothing in the pool (check the query inputs and the retrieval embedder)")
        elif share >= KEEPS_ALMOST_ALL:
            warnings.append(f"retrieval kept {kept:,} of {candidates:,} candidates ({100 * share:.1f} %): the "
                            f"pool was not rebalanced towards the query sets (lower retrieve.max_per_set or "
                            f"the cluster caps, or use sample-based retrieval)")
    if funnel.get("inputs", 0) > 0 and funnel.get("written", 0) == 0:
        warnings.append("no image was written: the curated shard set is empty")
    for w in warnings:
        log.warning("%s", w)
    return warnings
