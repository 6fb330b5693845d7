"""Assemble ``report/index.html`` from a curation output folder, training runs and eval results."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from curation import layout
from curation.funnel import ordered_funnel
from curation.store import EmbeddingStore, list_sources
from curation.text import stored_path
from demo.report import figures
from dinov2.data.shards import read_range
from dinov2.utils.io import atomic_write_text


# ---------------------------------------------------------------- reading the curation outputs
def _read_parquets(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet"))
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


class ImageBytes:
    """Original bytes of any embedded image (pool, eval or query) by id, via the embed index."""

    def __init__(self, curated_dir: Path):
        parts = [_read_parquets(layout.embed_dir(curated_dir, s)) for s in layout.sources(curated_dir)]
        parts = [p for p in parts if len(p)]
        index = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["id"])
        self.rows = index.set_index("id", drop=False)

    def get(self, image_id: str) -> bytes | None:
        if image_id not in self.rows.index:
            return None
        row = self.rows.loc[image_id]
        size = row.get("byte_size")
        if size is None or pd.isna(size) or int(size) <= 0:
            return None
        try:
            raw = row.get("input_path_bytes")
            path = stored_path(row["input_path"], raw if isinstance(raw, bytes) else None)
            return read_range(path, int(row.get("byte_offset") or 0), int(size))
        except OSError:
            return None


def _key_of(image_id: str) -> str:
    return image_id.rsplit("/", 1)[-1]


def decision_quality(curated_dir: Path, truth: dict) -> dict[str, float]:
    """Precision/recall of the dedup and decontamination drops against the crawl's ground truth.

    An overlapping crop of the same photo counts as the same content (curation/truth.py); the strict
    planted-copies-only precision is reported beside it.
    """
    from curation.truth import decision_quality as score

    return score(curated_dir, truth)


# ---------------------------------------------------------------- figures from the outputs
def _duplicate_gallery(curated_dir: Path, images: ImageBytes, path: Path, n_components: int = 6) -> Path:
    dedup = pd.read_parquet(layout.dedup_decisions(curated_dir))
    sizes = dedup.groupby("component")["id"].transform("size")
    multi = dedup[sizes > 1].copy()
    multi["size"] = sizes[sizes > 1]
    order = (multi.groupby("component")["size"].first().sort_values(ascending=False, kind="stable")
             .index[:n_components])
    rows = []
    for comp in order:
        members = multi[multi["component"] == comp].sort_values(["kept", "id"], ascending=[False, True]).head(7)
        cells = []
        for _, m in members.iterrows():
            label = "kept" if m["kept"] else str(m["reason"]).replace("_duplicate", "").replace("_", " ")
            if not m["kept"] and pd.notna(m.get("nn_sim")):
                label += f" {m['nn_sim']:.2f}"
            cells.append((images.get(m["id"]), label))
        rows.append((f"component {comp}\n{len(multi[multi['component'] == comp])} images", cells))
    return figures.image_rows(rows, path, "Duplicate components (first image kept, the rest dropped)")


def _retrieval_examples(curated_dir: Path, images: ImageBytes, path: Path, n_queries: int = 5) -> Path | None:
    """Query images and their most similar selected pool images (retrieval embedder, cosine)."""
    import numpy as np

    sel = pd.read_parquet(layout.retrieve_selection(curated_dir))
    info = json.loads(layout.retrieve_clusters(curated_dir).read_text())
    embedder = info.get("embedder", "")
    query_sources = list_sources(curated_dir, layout.QUERY_PREFIX)
    if not query_sources or not sel["selected"].any():
        return None
    pool = EmbeddingStore(curated_dir, layout.POOL, embedder)
    queries = EmbeddingStore(curated_dir, query_sources, embedder)
    chosen = np.flatnonzero(np.isin(pool.ids, sel.loc[sel["selected"], "id"].to_numpy()))
    pool_vecs = pool.vectors.gather(chosen).astype(np.float32)
    q_rows = np.linspace(0, len(queries.ids) - 1, num=min(n_queries, len(queries.ids))).round().astype(int)
    q_vecs = queries.vectors.gather(q_rows).astype(np.float32)
    sims = q_vecs @ pool_vecs.T
    rows = []
    for qi, q in enumerate(q_rows):
        top = np.argsort(-sims[qi], kind="stable")[:6]
        cells = [(images.get(queries.ids[q]), "query")]
        cells += [(images.get(pool.ids[chosen[j]]), f"{sims[qi, j]:.2f}") for j in top]
        rows.append((_key_of(queries.ids[q])[:18], cells))
    return figures.image_rows(rows, path, "Retrieval: query images and their nearest selected pool images")


def _decontam_examples(curated_dir: Path, images: ImageBytes, path: Path, n: int = 6) -> Path | None:
    dec = pd.read_parquet(layout.decontaminate_decisions(curated_dir))
    hit = dec[dec["contaminated"] & dec["eval_id"].notna()].sort_values("eval_sim", ascending=False).head(n)
    if hit.empty:
        return None
    rows = [(f"sim {r['eval_sim']:.2f}", [(images.get(r["eval_id"]), "eval image"), (images.get(r["id"]), "pool copy")])
            for _, r in hit.iterrows()]
    return figures.image_rows(rows, path, "Decontamination: evaluation images and the pool copies removed")


def _cluster_figure(curated_dir: Path, path: Path) -> Path | None:
    f = layout.retrieve_clusters(curated_dir)
    if not f.exists():
        return None
    info = json.loads(f.read_text())
    if "kmeans" in info:
        before, after = info["kmeans"].get("sizes_before"), info["kmeans"].get("sizes_after")
    elif "hkmeans" in info:  # leaf clusters of the hierarchical k-means
        before, after = info["hkmeans"].get("leaf_sizes_before"), info["hkmeans"].get("leaf_sizes_after")
    else:
        return None
    if not before or after is None:
        return None
    return figures.cluster_sizes(before, after, path)


def _calibration_rows(summary: dict) -> list[list]:
    rows = []
    for stage, rec in summary.get("calibration", {}).items():
        fam = ", ".join(f"{k} {v:.2f}" for k, v in rec.get("estimated_recall_per_family", {}).items())
        est = (lambda k: f"{rec[k]:.3f}" if k in rec else "")
        rows.append([stage, f"{rec.get('threshold', float('nan')):.3f}", rec.get("source", ""),
                     est("estimated_precision"), est("estimated_recall"), fam, "; ".join(rec.get("warnings", []))])
        v = rec.get("verify")
        if v and "min_inliers" in v:  # geometric verification: the cosine's near misses (curation/verify.py)
            fam = ", ".join(f"{k} {r:.2f}" for k, r in v.get("estimated_recall_per_family", {}).items())
            corr = f", correlation {v['min_correlation']:.2f}" if "min_correlation" in v else ""
            rows.append([f"{stage} + verification", f"{v['min_inliers']} inliers{corr}", rec.get("source", ""),
                         f"{v['estimated_precision']:.3f}" if "estimated_precision" in v else "",
                         f"{v['estimated_recall']:.3f}" if "estimated_recall" in v else "", fam,
                         "; ".join(v.get("warnings", []))])
    return rows


def _metrics(run_dir: Path) -> list[dict]:
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return []
    recs = []
    for line in f.read_text().splitlines():
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line of a killed run
    return recs


# ---------------------------------------------------------------- page
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2a44;color:#fff;padding:28px 40px}header h1{margin:0 0 6px;font-size:26px}
header p{margin:0;opacity:.8}main{max-width:1120px;margin:0 auto;padding:24px 40px 60px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:14px;margin:8px 0 26px}
.card{background:#fff;border-radius:10px;padding:14px 16px;box-shadow:0 1px 3px rgba(0,0,0,.08)}
.card .v{font-size:24px;font-weight:600}.card .l{font-size:13px;color:#5b6476;margin-top:4px}
section{background:#fff;border-radius:10px;padding:18px 22px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.08)}
section h2{margin:0 0 8px;font-size:19px}section p{color:#3d4556;line-height:1.45;margin:6px 0 12px}
img{max-width:100%;height:auto;border-radius:6px}table{border-collapse:collapse;font-size:14px}
td,th{padding:4px 12px;border-bottom:1px solid #e3e6eb;text-align:right}th:first-child,td:first-child{text-align:left}
code{background:#eef0f4;padding:1px 5px;border-radius:4px}
"""


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{html.escape(value)}</div><div class="l">{html.escape(label)}</div></div>'


def _section(title: str, text: str, img: Path | None, report_dir: Path, extra: str = "") -> str:
    pic = f'<img src="{img.relative_to(report_dir)}" alt="{html.escape(title)}">' if img else ""
    return f"<section><h2>{html.escape(title)}</h2><p>{text}</p>{extra}{pic}</section>"


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(report_dir: Path, data_dir: Path, curated_dir: Path, run_dirs: dict[str, Path],
                 eval_results: dict[str, dict[str, float]], truth: dict | None = None,
                 timings: dict[str, float] | None = None, model: Any = None, sample_images: list | None = None,
                 image_size: int = 112) -> Path:
    """Write ``report_dir/index.html`` (+ PNGs) and return its path."""
    report_dir = Path(report_dir)
    img_dir = report_dir / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    summary = json.loads(layout.summary(curated_dir).read_text())
    funnel = ordered_funnel(summary["funnel"])
    images = ImageBytes(curated_dir)
    quality = decision_quality(curated_dir, truth) if truth else {}

    sections = []
    if summary.get("warnings"):
        sections.append(_section(
            "Warnings", "The run finished, but these results are probably not what was meant:", None, report_dir,
            "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in summary["warnings"]) + "</ul>"))
    sections.append(_section(
        "Curation funnel",
        "Every input image is accounted for in <code>final/manifest.parquet</code>; undecodable inputs "
        "are dropped at the embed stage with their reason, duplicates at dedup, near-copies of the "
        "evaluation set at decontamination, and the rest is balanced by retrieval against the query set.",
        figures.funnel(funnel, img_dir / "funnel.png"), report_dir,
        _table([[k.replace("_", " "), f"{v:,}"] for k, v in funnel.items()], ["stage", "images"])))
    manifest = pd.read_parquet(layout.manifest(curated_dir))
    reasons = manifest.loc[manifest["decision"] != "kept"].groupby(["stage", "reason"], dropna=False).size()
    sections.append(_section(
        "Why images were dropped", "Counts by stage and reason, from the manifest.", None, report_dir,
        _table([[s, r, n] for (s, r), n in reasons.items()], ["stage", "reason", "images"])))
    q_text = ""
    if quality:
        q_text = (f" Against the planted ground truth: of the images dedup dropped, "
                  f"{100 * quality['dedup_precision']:.0f} % repeat content that stays (a planted copy or an "
                  f"overlapping crop of the same photo; planted copies alone: "
                  f"{100 * quality.get('dedup_precision_planted_only', quality['dedup_precision']):.0f} %), and it "
                  f"found {100 * quality['dedup_recall']:.0f} % of the planted copies; decontamination: "
                  f"{100 * quality['decontam_precision']:.0f} % of its drops show an evaluation image's content, "
                  f"{100 * quality['decontam_recall']:.0f} % of the planted evaluation copies are gone.")
    sections.append(_section(
        "Duplicate components",
        "Connected components of the exact-hash, perceptual-hash and k-NN similarity graph; one "
        "representative per component is kept." + q_text,
        _duplicate_gallery(curated_dir, images, img_dir / "duplicates.png"), report_dir))
    cal_rows = _calibration_rows(summary)
    if cal_rows:
        sections.append(_section(
            "Copy-detection thresholds",
            "Thresholds left unset are calibrated on synthetic copies planted on the data itself "
            "(curation/calibrate.py); estimated precision and recall per transformation family.", None,
            report_dir, _table(cal_rows, ["stage", "threshold", "source", "est. precision", "est. recall",
                                          "est. recall per family", "warnings"])))
    choice = summary.get("retrieval", {})
    if choice.get("per_set"):
        rows = [[n, v.get("method"), v.get("selected"), v.get("why", "")] for n, v in choice["per_set"].items()]
        sections.append(_section("Retrieval choice", html.escape("; ".join(choice.get("warnings", []))) or
                                 "Method per query set and why (curation/retrieval_plan.py).", None, report_dir,
                                 _table(rows, ["query set", "method", "selected", "why"])))
    dec = _decontam_examples(curated_dir, images, img_dir / "decontamination.png")
    if dec:
        sections.append(_section("Decontamination", "Pool images whose component touches an evaluation image "
                                 "above the threshold are removed.", dec, report_dir))
    ret = _retrieval_examples(curated_dir, images, img_dir / "retrieval.png")
    if ret:
        sections.append(_section("Retrieval examples", "Query images of the curated set and the pool images they "
                                 "retrieved (cosine similarity under each).", ret, report_dir))
    clus = _cluster_figure(curated_dir, img_dir / "clusters.png")
    if clus:
        sections.append(_section("Cluster balance", "k-means clusters of the candidate pool, before and after "
                                 "selection: balancing flattens the head of the distribution.", clus, report_dir))

    for name, run in run_dirs.items():
        recs = _metrics(run)
        if recs:
            phase_starts = [r["step"] for a, r in zip(recs, recs[1:]) if r.get("phase") != a.get("phase")]
            fig = figures.training_curves(recs, img_dir / f"curves_{name}.png", phase_starts)
            sections.append(_section(f"Training curves ({name})", f"{len(recs)} logged steps of <code>{run.name}"
                                     "</code>: every loss term, the learning rate and the teacher entropy "
                                     "(a collapse monitor); dotted lines mark phase changes.", fig, report_dir))

    shown = {"knn_top1_k10": "k-NN k=10", "knn_top1_k20": "k-NN k=20", "linear_top1": "linear"}
    eval_fig = figures.accuracy_bars(
        {m: {label: r[k] for k, label in shown.items() if k in r} for m, r in eval_results.items()},
        img_dir / "eval.png", "Frozen-feature accuracy on the held-out set")
    sections.append(_section("Evaluation", "Weighted k-NN (T = 0.07) and a linear probe on frozen CLS "
                             "features, for the trained teacher and for the same architecture at random init.",
                             eval_fig, report_dir))

    if model is not None and sample_images:
        from demo.report.visualize import cls_attention, patch_pca

        crops, pcs = patch_pca(model, sample_images, image_size)
        pca_fig = figures.feature_maps(crops, pcs, img_dir / "pca.png", "First 3 PCA components of patch features")
        crops, att = cls_attention(model, sample_images, image_size)
        att_fig = figures.feature_maps(crops, att, img_dir / "attention.png", "CLS attention, last layer",
                                       cmap="inferno")
        sections.append(_section("What the model sees", "Patch features projected on their first three principal "
                                 "components (as RGB), and the last layer's CLS-token attention averaged over "
                                 "heads.", att_fig, report_dir, f'<img src="{pca_fig.relative_to(report_dir)}">'))

    trained = eval_results.get("trained", {})
    base = eval_results.get("random init", {})
    cards = [
        _card(f"{funnel.get('inputs', 0):,} → {funnel.get('written', 0):,}", "crawl images → curated"),
        _card(f"{100 * trained.get('knn_top1_k20', float('nan')):.1f}%",
              f"k-NN (k=20) trained vs {100 * base.get('knn_top1_k20', float('nan')):.1f}% random init"),
    ]
    if quality:
        cards.append(_card(f"{quality['dedup_precision']:.2f} / {quality['dedup_recall']:.2f}",
                           "dedup: drops repeating kept content / planted copies found"))
        cards.append(_card(f"{quality['decontam_precision']:.2f} / {quality['decontam_recall']:.2f}",
                           "decontamination: drops showing eval content / eval copies removed"))
    if timings:
        cards.append(_card(f"{sum(timings.values()) / 60:.1f} min", "wall time, " + ", ".join(
            f"{k} {v:.0f}s" for k, v in timings.items())))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Curation + training report</title>"
            f"<style>{CSS}</style></head><body><header><h1>Curated data → self-supervised ViT</h1>"
            f"<p>{html.escape(str(data_dir))} → {html.escape(str(curated_dir))}</p></header><main>"
            f"<div class='cards'>{''.join(cards)}</div>{''.join(sections)}</main></body></html>")
    index = report_dir / "index.html"
    atomic_write_text(index, page)
    atomic_write_text(report_dir / "numbers.json", json.dumps(
        {"funnel": funnel, "quality": quality, "eval": eval_results, "timings": timings or {}}, indent=2))
    return index
