"""Scoring curation decisions against a synthetic crawl's planted truth (curation/synth.py).

The demo crawl is many random crops of a few photos, so two "distinct" base images
often show the same part of one photo.  Counting such a pair as a false duplicate
made the demo headline dedup precision 0.58 and decontamination precision 0.18 —
numbers a user reads as a broken pipeline, although the dropped image repeats
content that stays in the curated set.  Here an image counts as a correct drop when
it shows the same content as the image it was matched with: a planted copy of it,
or a crop of the same photo overlapping it by at least ``MIN_OVERLAP`` of the
smaller region.  The strict, planted-copies-only figures are reported beside them.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from curation import layout

MIN_OVERLAP = 0.5  # intersection / smaller box: "mostly the same part of the photo"


def _key(image_id: str) -> str:
    return image_id.rsplit("/", 1)[-1]


def overlap(a, b) -> float:
    """Intersection over the smaller box area (0 when either box is unknown)."""
    if not a or not b:
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / smaller if smaller > 0 else 0.0


def same_content(x: dict | None, y: dict | None) -> bool:
    """Same planted group, or overlapping crops of the same photo."""
    if not x or not y:
        return False
    if x.get("group", -1) >= 0 and x.get("group") == y.get("group"):
        return True
    return bool(x.get("photo")) and x.get("photo") == y.get("photo") and overlap(x.get("box"), y.get("box")) >= MIN_OVERLAP


def _eval_members(curated_dir: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in (f for source in layout.sources(curated_dir, layout.EVAL_PREFIX)
              for _, f in layout.embed_shards(curated_dir, source)):
        t = pd.read_parquet(f, columns=["id", "member"])
        out.update(zip(t["id"], t["member"].fillna("")))
    return out


def decision_quality(curated_dir: str | Path, truth: dict) -> dict[str, float]:
    """Precision / recall of dedup and decontamination drops (same-content and strict)."""
    curated_dir = Path(curated_dir)
    items = truth["items"]
    evals = truth.get("eval", {})
    groups = Counter(v["group"] for v in items.values() if v["group"] >= 0)
    extra_copies = sum(n - 1 for n in groups.values() if n > 1)
    dedup = pd.read_parquet(layout.dedup_decisions(curated_dir))
    dropped = dedup[~dedup["kept"]]
    strict = same = 0
    for i, rep in zip(dropped["id"], dropped["representative_id"]):
        x, y = items.get(_key(i)), items.get(_key(rep))
        strict += bool(x and y and x["group"] >= 0 and x["group"] == y["group"])
        same += same_content(x, y)
    n = len(dropped)
    # recall: planted extra copies whose component also holds another member of their group
    comp = dedup.assign(group=[items.get(_key(i), {}).get("group", -1) for i in dedup["id"]])
    found = 0
    for _, g in comp[comp["group"] >= 0].groupby("group"):
        if len(g) > 1:
            found += len(g) - g["component"].nunique()
    out: dict[str, float] = {
        "dedup_dropped": float(n),
        "dedup_precision": same / n if n else 1.0,
        "dedup_precision_planted_only": strict / n if n else 1.0,
        "dedup_recall": found / extra_copies if extra_copies else 1.0,
    }
    manifest = pd.read_parquet(layout.manifest(curated_dir), columns=["id", "stage", "decision"])
    dc = pd.read_parquet(layout.decontaminate_decisions(curated_dir)).set_index("id")
    removed = manifest.loc[manifest["stage"] == "decontaminate", "id"].tolist()
    member = _eval_members(curated_dir)  # eval image id → its path inside the eval folder (truth key)
    hits = strict_hits = 0
    for i in removed:
        x = items.get(_key(i), {})
        strict_hits += x.get("kind") == "eval_copy"
        eid = dc["eval_id"].get(i) if i in dc.index else None
        e = evals.get(member.get(eid, "")) if isinstance(eid, str) else None
        # the eval image it matched: planted copy of it, or the same part of the same photo
        hits += x.get("kind") == "eval_copy" or same_content(x, e)
    eval_copies = [k for k, v in items.items() if v["kind"] == "eval_copy"]
    out_at = manifest["stage"].isin(["dedup", "decontaminate"]) & (manifest["decision"] == "dropped")
    gone_keys = set(manifest.loc[out_at, "id"].map(_key))  # removed before retrieval, either way
    gone = sum(1 for k in eval_copies if k in gone_keys)
    out.update({
        "decontam_dropped": float(len(removed)),
        "decontam_precision": hits / len(removed) if removed else 1.0,
        "decontam_precision_planted_only": strict_hits / len(removed) if removed else 1.0,
        "decontam_recall": gone / len(eval_copies) if eval_copies else 1.0,
    })
    return out
