"""How retrieval runs when left on ``auto``: method and k-means size from the pool and query-set sizes.

The DINOv2 paper (§3, App. A) retrieves with the sample-based rule (k nearest
candidates per query image) for query sets of more than 1M images and with the
cluster-based rule (whole k-means clusters holding more than 3 query images, 100k
clusters) for smaller sets — against ~744M deduplicated, decontaminated candidates.
Read as ratios, so the rule means the same at every scale:

- sample-based when the query set holds at least one image per
  ``PAPER_CANDIDATES_PER_QUERY`` candidates (1M per ~744M); cluster-based below,
  but only when the candidates can form clusters finer than a query concept
  (at least ``MIN_CLUSTERS`` clusters of ``MIN_CLUSTER_SIZE``); else sample-based;
- clusters of the paper's size (~7,400 candidates) at scale, and √N clusters for
  smaller pools so that a cluster stays a small share of the pool.

A 641-candidate crawl with 72 query images is therefore sample-based (before,
the absolute 1M rule made it cluster-based over 12 clusters and it kept 573
images: nothing was enriched).
"""
from __future__ import annotations

import json
import math

from curation import layout

PAPER_CANDIDATES_PER_QUERY = 744  # ~744M candidates / 1M-image query sets
PAPER_CLUSTER_SIZE = 7_440  # ~744M candidates / 100k clusters
MIN_CLUSTERS = 16
MIN_CLUSTER_SIZE = 16
KEEP_ALMOST_ALL = 0.9  # warn above this share of the candidates kept
KEEP_ALMOST_NONE = 0.01  # … and below this one


def auto_n_clusters(n_candidates: int) -> tuple[int, str]:
    """(k-means size, why) for cluster-based retrieval over ``n_candidates``."""
    if n_candidates <= 1:
        return max(1, n_candidates), "one candidate or none"
    by_paper = round(n_candidates / PAPER_CLUSTER_SIZE)
    by_sqrt = round(math.sqrt(n_candidates))
    k = max(1, min(n_candidates, max(by_paper, by_sqrt)))
    rule = "the paper's ~7,400 candidates per cluster" if by_paper >= by_sqrt else "sqrt(candidates)"
    return k, f"{k} clusters for {n_candidates} candidates ({rule})"


def auto_method(n_candidates: int, n_queries: int, sample_min_queries: int = 0) -> tuple[str, str]:
    """(sample | cluster, why) for a query set of ``n_queries`` images."""
    if sample_min_queries > 0:  # an explicit absolute rule from the config
        m = "sample" if n_queries >= sample_min_queries else "cluster"
        return m, f"{n_queries} query images {'>=' if m == 'sample' else '<'} retrieve.sample_min_queries"
    need = max(1, math.ceil(n_candidates / PAPER_CANDIDATES_PER_QUERY))
    if n_queries >= need:
        return "sample", (f"{n_queries} query images >= 1 per {PAPER_CANDIDATES_PER_QUERY} candidates "
                          f"({need} for {n_candidates}): the paper's sample-based regime")
    if n_candidates < MIN_CLUSTERS * MIN_CLUSTER_SIZE:
        return "sample", (f"{n_candidates} candidates are too few for clusters finer than the query set "
                          f"(< {MIN_CLUSTERS}×{MIN_CLUSTER_SIZE})")
    return "cluster", (f"{n_queries} query images < {need} (1 per {PAPER_CANDIDATES_PER_QUERY} candidates): "
                       "the paper's cluster-based regime")


def selection_warnings(n_candidates: int, n_selected: int, with_queries: bool) -> list[str]:
    """Warnings when retrieval keeps almost every candidate or almost none."""
    if not with_queries or n_candidates == 0:
        return []
    share = n_selected / n_candidates
    if n_selected == 0:
        return [("retrieval selected nothing: no candidate is close to the query sets "
                 "(check the query images and the retrieval embedder)")]
    if share > KEEP_ALMOST_ALL:
        return [(f"retrieval kept {100 * share:.0f} % of the candidates: the query sets enrich nothing "
                 "(use sample-based retrieval or a smaller k / more clusters)")]
    if share < KEEP_ALMOST_NONE:
        return [(f"retrieval kept only {100 * share:.2f} % of the candidates ({n_selected}): "
                 "check the query sets and k")]
    return []


def read_choice(out_dir) -> dict:
    """What retrieval chose and why (from ``OUT/retrieve/clusters.json``), for summary.json and the report."""
    f = layout.retrieve_clusters(out_dir)
    if not f.is_file():
        return {}
    info = json.loads(f.read_text())
    out = {"candidates": info.get("candidates"), "selected": info.get("selected"),
           "per_set": info.get("per_set", {}), "warnings": info.get("warnings", [])}
    if "kmeans" in info:
        out["kmeans"] = {"n_clusters": info["kmeans"].get("n_clusters"), "why": info["kmeans"].get("why")}
    return out
