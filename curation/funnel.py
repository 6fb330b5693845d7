"""The curation funnel: how many input images survive each stage (from the manifest)."""
from __future__ import annotations

import pandas as pd

STAGES = ("embed", "dedup", "decontaminate", "retrieve", "write")


def funnel_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """inputs → decoded → after dedup → after decontamination → retrieved → written."""
    stage = manifest["stage"]
    kept = manifest["decision"] == "kept"
    dropped_at = {s: int(((stage == s) & ~kept).sum()) for s in STAGES}
    inputs = len(manifest)
    decoded = inputs - dropped_at["embed"]
    after_dedup = decoded - dropped_at["dedup"]
    after_decon = after_dedup - dropped_at["decontaminate"]
    retrieved = after_decon - dropped_at["retrieve"]
    return {
        "inputs": inputs,
        "decoded": decoded,
        "after_dedup": after_dedup,
        "after_decontamination": after_decon,
        "retrieved": retrieved,
        "written": int(kept.sum()),
    }


FUNNEL_ORDER = ("inputs", "decoded", "after_dedup", "after_decontamination", "retrieved", "written")


def format_funnel(funnel: dict[str, int]) -> str:
    keys = [k for k in FUNNEL_ORDER if k in funnel]  # summary.json stores keys sorted; print in flow order
    width = max(len(k) for k in keys)
    total = max(funnel.get("inputs", 0), 1)
    return "\n".join(f"  {k:<{width}} {funnel[k]:>12,d}  ({100.0 * funnel[k] / total:5.1f}%)" for k in keys)


def ordered_funnel(funnel: dict[str, int]) -> dict[str, int]:
    """Funnel counts in pipeline order (JSON files may store them sorted by name)."""
    known = [k for k in FUNNEL_ORDER if k in funnel]
    return {k: funnel[k] for k in known + sorted(set(funnel) - set(known))}
