"""The curation output folder (``OUT``): where every stage's files live, in one place.

ARCHITECTURE.md describes the contract; stages, the audit, the CLI and the report build their paths
here instead of joining folder names themselves::

    OUT/config.yaml
    OUT/embed/<source>/<shard_id>.parquet, <shard_id>.<embedder>.npy
    OUT/dedup/decisions.parquet, stats.json
    OUT/dedup/work/plan.json, centroids.npy, pieces/b*.npy, edges/t*  (sharded dedup's map outputs)
    OUT/decontaminate/decisions.parquet, stats.json
    OUT/decontaminate/work/plan.json, matches/b*.parquet         (sharded decontamination's map outputs)
    OUT/whiten/<embedder>-<tag>.npz           (copy-detection whitening fitted on the pool; tag = its settings)
    OUT/retrieve/selection.parquet, clusters.json
    OUT/write/plan.parquet, write/shards/<shard>.json      (bookkeeping of the write stage)
    OUT/write/plan/b*.parquet, write/work/plan.json, decided/, pieces/  (the sharded write plan)
    OUT/final/<prefix>-000000.tar …, manifest.parquet, summary.json, audit.txt
"""
from __future__ import annotations

import re
from pathlib import Path

POOL = "pool"
EVAL_PREFIX = "eval-"
QUERY_PREFIX = "query-"
SHARD_PARQUET_RE = re.compile(r"^(s\d{6,})\.parquet$")


def config_path(out: str | Path) -> Path:
    return Path(out) / "config.yaml"


# ----------------------------------------------------------------------------- embed
def shard_id(index: int) -> str:
    """Shard id of the ``index``-th input of a source's sorted, expanded input list."""
    return f"s{index:06d}"


def embed_dir(out: str | Path, source: str) -> Path:
    return Path(out) / "embed" / source


def embed_parquet(out: str | Path, source: str, shard: str) -> Path:
    return embed_dir(out, source) / f"{shard}.parquet"


def embed_npy(out: str | Path, source: str, shard: str, embedder: str) -> Path:
    return embed_dir(out, source) / f"{shard}.{embedder}.npy"


def embed_shards(out: str | Path, source: str) -> list[tuple[str, Path]]:
    """``(shard id, parquet path)`` of a source's finished shards, sorted by shard id."""
    folder = embed_dir(out, source)
    if not folder.is_dir():
        return []
    found = ((SHARD_PARQUET_RE.match(p.name), p) for p in folder.iterdir())
    return sorted((m.group(1), p) for m, p in found if m)


def embedders_present(out: str | Path, source: str) -> set[str]:
    """Names of the embedders with ``.npy`` files for ``source``."""
    names = set()
    folder = embed_dir(out, source)
    if folder.is_dir():
        for p in folder.glob("s*.*.npy"):
            parts = p.name.split(".")
            if len(parts) >= 3:
                names.add(".".join(parts[1:-1]))
    return names


def sources(out: str | Path, prefix: str | None = None) -> list[str]:
    """Sources with an embed folder (``pool``, ``eval-<name>``, ``query-<name>``), sorted."""
    root = Path(out) / "embed"
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [n for n in names if prefix is None or n == prefix or n.startswith(prefix)]


# ----------------------------------------------------------------------------- decisions
def dedup_decisions(out: str | Path) -> Path:
    return Path(out) / "dedup" / "decisions.parquet"


def dedup_work(out: str | Path) -> Path:
    """Intermediate files of the sharded dedup (map outputs; the reduce writes the decisions)."""
    return Path(out) / "dedup" / "work"


def dedup_work_plan(out: str | Path) -> Path:
    return dedup_work(out) / "plan.json"


def dedup_centroids(out: str | Path) -> Path:
    return dedup_work(out) / "centroids.npy"


def dedup_piece(out: str | Path, block: int, part: str) -> Path:
    """One assign task's rows in list order: ``part`` is vec | rows | probes | counts (counts last)."""
    return dedup_work(out) / "pieces" / f"b{block:06d}.{part}.npy"


def dedup_edges(out: str | Path, task: int, part: str) -> Path:
    """One search task's output: ``part`` is forest.npy | nn.parquet | done.json (written last)."""
    return dedup_work(out) / "edges" / f"t{task:06d}.{part}"


def decontaminate_decisions(out: str | Path) -> Path:
    return Path(out) / "decontaminate" / "decisions.parquet"


def decontaminate_work(out: str | Path) -> Path:
    return Path(out) / "decontaminate" / "work"


def decontaminate_matches(out: str | Path, block: int) -> Path:
    """One match task's best eval match per pool row of its block."""
    return decontaminate_work(out) / "matches" / f"b{block:06d}.parquet"


def whitening(out: str | Path, embedder: str, tag: str) -> Path:
    """The whitening fitted on the pool's ``embedder`` vectors with the settings hashed into ``tag``."""
    return Path(out) / "whiten" / f"{embedder}-{tag}.npz"


def retrieve_selection(out: str | Path) -> Path:
    return Path(out) / "retrieve" / "selection.parquet"


def retrieve_work(out: str | Path) -> Path:
    """Intermediate files of the sharded retrieval (map outputs; the reduce writes the selection)."""
    return Path(out) / "retrieve" / "work"


def retrieve_part(out: str | Path, step: str, block: int) -> Path:
    """One map task's output: ``step`` is hits (sample-based top-k) | labels (k-means assignment)."""
    return retrieve_work(out) / step / f"b{block:06d}.parquet"


def calibration(out: str | Path, stage: str) -> Path:
    """Calibrated threshold of a stage (dedup / decontaminate) and its estimated quality."""
    return Path(out) / "calibrate" / f"{stage}.json"


def retrieve_clusters(out: str | Path) -> Path:
    return Path(out) / "retrieve" / "clusters.json"


def stats_path(decisions: Path) -> Path:
    """The stats file written beside a stage's decisions."""
    return decisions.parent / "stats.json"


# ----------------------------------------------------------------------------- write / final
def write_plan(out: str | Path) -> Path:
    return Path(out) / "write" / "plan.parquet"


def write_shard_record(out: str | Path, shard_name: str) -> Path:
    return Path(out) / "write" / "shards" / f"{Path(shard_name).stem}.json"


def output_shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def final_dir(out: str | Path) -> Path:
    return Path(out) / "final"


def final_shard(out: str | Path, shard_name: str) -> Path:
    return final_dir(out) / shard_name


def manifest(out: str | Path) -> Path:
    return final_dir(out) / "manifest.parquet"


def summary(out: str | Path) -> Path:
    return final_dir(out) / "summary.json"


def audit_report(out: str | Path) -> Path:
    return final_dir(out) / "audit.txt"
