"""Curation quality on real photos with NO hand-set threshold (issue 14).

Builds an img2dataset-style crawl from real, distinct photos (the sign-digits hand
photos and the photos that ship inside scikit-image / scikit-learn / matplotlib),
plants exact copies, near copies and near copies of a held-out evaluation set with
THIS file's own transformation set — deliberately different from the one
calibration plants (curation/plant.py): other operations (blur, text, paste into a
larger canvas, gamma / greyscale, WebP) and other parameter ranges — adds junk,
runs ``curate`` (embed → dedup → decontaminate → retrieve → write) with Lite0 and
thresholds left to calibration, and prints:

- near-copy recall per transformation family and the precision of everything
  dedup dropped;
- eval-copy recall and precision of decontamination;
- share of query-class images raw → curated for a small query set (two classes);
- stage timings, with calibration's cost relative to embed + dedup; with ``--explicit-rerun``
  each calibrated column is run again with its calibrated values given explicitly, so what
  calibration adds is the difference of the two runs' dedup + decontamination (verification
  features are shared by a stage and its calibration, so calibration's own seconds overstate it).

    python bench/curation_quality.py [--descriptor global flip regions] [--whitening none pca] [--photos DIR]

Each (descriptor, whitening) pair is one column; a whitening variant reuses the embeddings of
the descriptor's first run (same embedder, so the embed stage is copied, not recomputed).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation import layout  # noqa: E402
from dinov2.data.shards import ShardWriter  # noqa: E402

SIGN_DIGITS = REPO.parent / "shared" / "data" / "sign-digits"


# ----------------------------------------------------------------------------- bench transformations
def _jpeg(img, q):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(q))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _webp(img, q):
    buf = io.BytesIO()
    img.save(buf, format="WEBP", quality=int(q))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(rng, img, lo=0.55, hi=0.9):
    w, h = img.size
    area = rng.uniform(lo, hi)
    aspect = rng.uniform(0.7, 1.45)
    cw, ch = min(w, round(w * np.sqrt(area * aspect))), min(h, round(h * np.sqrt(area / aspect)))
    # anchored off-centre: at a border or corner half of the time
    x0 = int(rng.choice([0, w - cw, rng.integers(0, w - cw + 1)]))
    y0 = int(rng.choice([0, h - ch, rng.integers(0, h - ch + 1)]))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def _resize(img, s):
    return img.resize((max(8, round(img.width * s)), max(8, round(img.height * s))), Image.Resampling.LANCZOS)


def bench_copy(rng, img, family):
    if family == "reencode":
        return _webp(img, rng.integers(10, 40)) if rng.random() < 0.5 else _jpeg(img, rng.integers(8, 20))
    if family == "half_size":
        return _resize(img, rng.uniform(0.35, 0.6))
    if family == "colour":
        if rng.random() < 0.4:
            return ImageOps.grayscale(img).convert("RGB")
        g = rng.choice([rng.uniform(0.5, 0.75), rng.uniform(1.35, 1.9)])
        lut = [min(255, round(255 * (i / 255) ** g)) for i in range(256)] * 3
        return img.point(lut)
    if family == "flip":
        return _jpeg(ImageOps.mirror(img), rng.integers(70, 95))
    if family == "crop":
        return _crop(rng, img)
    if family == "crop_flip_resize_reencode":
        return _jpeg(_resize(ImageOps.mirror(_crop(rng, img, 0.6, 0.9)), rng.uniform(0.6, 1.4)), rng.integers(30, 70))
    if family == "blur":
        return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 2.0)))
    if family == "text":
        out = img.copy()
        d = ImageDraw.Draw(out)
        for _ in range(int(rng.integers(1, 3))):
            x, y = rng.uniform(0, 0.6) * out.width, rng.uniform(0, 0.85) * out.height
            d.text((x, y), "SALE %d" % rng.integers(10, 99), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        return out
    if family == "paste":  # pasted into a larger noisy canvas (DISC21 "paste into an image")
        s = rng.uniform(1.12, 1.3)
        W, H = round(img.width * s), round(img.height * s)
        canvas = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
        canvas.paste(img, (int(rng.integers(0, W - img.width + 1)), int(rng.integers(0, H - img.height + 1))))
        return canvas
    raise ValueError(family)


FAMILIES = ("reencode", "half_size", "colour", "flip", "crop", "crop_flip_resize_reencode", "blur", "text", "paste")


# ----------------------------------------------------------------------------- crawl
def _photos(folder: Path | None):
    from curation.synth import load_photos

    out = []  # (name, class, image)
    root = folder or SIGN_DIGITS
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in {".jpg", ".jpeg", ".png"}:
                out.append((f"{p.parent.name}__{p.stem}", p.parent.name, Image.open(p).convert("RGB")))
    out += [(n, "packaged", im) for n, im in load_photos(None, max_side=320)]
    return out


def build(root: Path, photos, seed: int, copies_per_family: int, n_exact: int, n_eval: int,
          query_classes: tuple[str, ...], n_query: int, n_pool: int):
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(photos))
    signs = [i for i in order if photos[i][1] != "packaged"]
    query_idx = [i for i in signs if photos[i][1] in query_classes][:n_query]
    rest = [i for i in order if i not in set(query_idx)]
    eval_idx = [i for i in rest if photos[i][1] != "packaged"][:n_eval]
    pool_idx = [i for i in rest if i not in set(eval_idx)][:n_pool]
    items = []  # (bytes, truth)

    def enc(img):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        return buf.getvalue()

    for g, i in enumerate(pool_idx):
        items.append((enc(photos[i][2]), {"kind": "unique", "group": int(i), "cls": photos[i][1], "family": None}))
    for i in rng.choice(len(pool_idx), n_exact, replace=False):
        items.append((items[int(i)][0], dict(items[int(i)][1], kind="exact")))
    for fam in FAMILIES:
        for i in rng.choice(pool_idx, copies_per_family, replace=False):
            items.append((enc(bench_copy(rng, photos[i][2], fam)),
                          {"kind": "near", "group": int(i), "cls": photos[i][1], "family": fam}))
    (root / "eval").mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(eval_idx):
        (root / "eval" / f"{j:05d}.jpg").write_bytes(enc(photos[i][2]))
        if j % 2 == 0:  # half of the eval set has a near copy in the crawl
            fam = FAMILIES[(j // 2) % len(FAMILIES)]
            items.append((enc(bench_copy(rng, photos[i][2], fam)),
                          {"kind": "eval_copy", "group": int(i), "cls": photos[i][1], "family": fam}))
    (root / "query").mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(query_idx):
        (root / "query" / f"{j:05d}.jpg").write_bytes(enc(photos[i][2]))
    for j in range(8):  # junk
        items.append(([b"", b"<html>404</html>", bytes(rng.integers(0, 256, 999, dtype=np.uint8)),
                       items[0][0][:500]][j % 4], {"kind": "junk", "group": -1, "cls": None, "family": None}))
    perm = rng.permutation(len(items))
    truth = {}
    (root / "crawl").mkdir(parents=True, exist_ok=True)
    per = 500
    for s in range(0, len(perm), per):
        with ShardWriter(root / "crawl" / f"{s // per:05d}.tar") as tar:
            for pos, i in enumerate(perm[s : s + per]):
                key = f"{s // per:05d}{pos:04d}"
                data, t = items[int(i)]
                tar.add(f"{key}.jpg", data)
                tar.add(f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())
                truth[key] = t
    return truth


# ----------------------------------------------------------------------------- scoring
def score(out: Path, truth: dict, query_classes) -> dict:
    import pandas as pd

    key = lambda i: i.rsplit("/", 1)[-1]
    dd = pd.read_parquet(layout.dedup_decisions(out))
    dd["key"] = dd["id"].map(key)
    dd["group"] = dd["key"].map(lambda k: truth[k]["group"])
    comp_groups = dd.groupby("component")["group"].agg(lambda g: g.tolist())
    rep_group = dd.set_index("id")["group"]
    res: dict = {"families": {}}
    dropped = dd[~dd["kept"]]
    ok = dropped["representative_id"].map(rep_group).to_numpy() == dropped["group"].to_numpy()
    res["dedup_dropped"] = len(dropped)
    res["dedup_precision"] = float(ok.mean()) if len(dropped) else 1.0
    comp_of = dd.set_index("key")["component"]
    for fam in ("exact", *FAMILIES):
        keys = [k for k, t in truth.items() if (t["kind"] == "exact" and fam == "exact")
                or (t["kind"] == "near" and t["family"] == fam)]
        found = [truth[k]["group"] in [g for g in comp_groups[comp_of[k]]] and
                 sum(1 for g in comp_groups[comp_of[k]] if g == truth[k]["group"]) > 1 for k in keys if k in comp_of]
        res["families"][fam] = (float(np.mean(found)) if found else float("nan"), len(found))
    near = [v for f, v in res["families"].items() if f != "exact"]
    res["near_recall_overall"] = float(np.average([r for r, _ in near], weights=[n for _, n in near]))
    dc = pd.read_parquet(layout.decontaminate_decisions(out))
    dc["key"] = dc["id"].map(key)
    is_copy = dc["key"].map(lambda k: truth[k]["kind"] == "eval_copy")
    n_copies = sum(1 for t in truth.values() if t["kind"] == "eval_copy")
    hit = dc["contaminated"] & is_copy
    res["eval_recall"] = float(hit.sum() / n_copies) if n_copies else 1.0
    res["eval_precision"] = float(hit.sum() / dc["contaminated"].sum()) if dc["contaminated"].any() else 1.0
    res["eval_dropped"] = int(dc["contaminated"].sum())
    sel = pd.read_parquet(layout.retrieve_selection(out))
    qcls = lambda i: truth[key(i)]["cls"] in query_classes
    res["raw_share"] = float(dd["id"].map(qcls).mean())
    chosen = sel[sel["selected"]]
    res["curated_share"] = float(chosen["id"].map(qcls).mean()) if len(chosen) else float("nan")
    res["selected"] = len(chosen)
    res["candidates"] = len(sel)
    return res


def run_one(root: Path, descriptor: str, seed: int, image_size: int, whitening: str = "none",
            verify: bool = False, explicit: dict | None = None, extra: tuple[str, ...] = ()) -> dict:
    import shutil

    from curation.config import load_curation_config

    first = root / f"out-{descriptor}"
    out = first if whitening == "none" and not verify else root / f"out-{descriptor}-{whitening}{'-verify' * verify}"
    if explicit is not None:  # the same run with calibration's values given: what calibration adds
        out = out.with_name(out.name + "-explicit")
    if out != first and not (out / "embed").exists() and (first / "embed" / "_stage.json").is_file():
        shutil.copytree(first / "embed", out / "embed")  # same embedder: reuse the embeddings
    overrides = [
        f"dedup.whitening.kind={whitening}", f"decontaminate.whitening.kind={whitening}",
        f"dedup.verify.enabled={str(verify).lower()}", f"decontaminate.verify.enabled={str(verify).lower()}",
        f"output_dir={out}", f"inputs=[{root / 'crawl'}/*.tar]", f"eval_sets.bench=[{root / 'eval'}]",
        f"query_sets.q.inputs=[{root / 'query'}]",
        "embedders.lite0.kind=efficientnet_lite0", "embedders.lite0.device=cpu", "embedders.lite0.batch_size=64",
        f"embedders.lite0.descriptor={descriptor}", f"embedders.lite0.image_size={image_size}", "executor.cluster=debug", f"seed={seed}",
    ]
    overrides += list(extra)
    for stage, rec in (explicit or {}).items():
        overrides.append(f"{stage}.threshold={rec['threshold']}")
        if verify and "verify" in rec:
            overrides += [f"{stage}.verify.min_inliers={rec['verify']['min_inliers']}",
                          f"{stage}.verify.min_correlation={rec['verify']['min_correlation']}"]
    cfg = load_curation_config(None, overrides)
    t0 = time.perf_counter()
    timings = {}
    from curation.pipeline import STAGES, prepare_output, run_stage

    prepare_output(cfg)
    for stage in STAGES:
        t = time.perf_counter()
        run_stage(cfg, stage, progress=False)
        timings[stage] = time.perf_counter() - t
    summary = json.loads(layout.summary(out).read_text())
    timings["total"] = time.perf_counter() - t0
    return {"summary": summary, "timings": timings, "out": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--descriptor", nargs="+", default=["global"])
    ap.add_argument("--whitening", nargs="+", default=["none"], choices=["none", "pca"],
                    help="copy-detection whitening of dedup / decontamination (curation/whiten.py)")
    ap.add_argument("--verify", nargs="+", default=["off"], choices=["off", "on"],
                    help="geometric verification of near misses in dedup / decontamination (curation/verify.py)")
    ap.add_argument("--photos", type=Path, default=None, help="class-subfolder photo folder (default: sign-digits)")
    ap.add_argument("--copies-per-family", type=int, default=20)
    ap.add_argument("--n-pool", type=int, default=800, help="distinct photos in the pool")
    ap.add_argument("--image-size", type=int, default=128, help="Lite0 input side (sign-digits photos are 100 px)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every run, e.g. dedup.verify.candidates=32")
    ap.add_argument("--explicit-rerun", action="store_true",
                    help="run each column again with its calibrated values given (calibration's added time)")
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    root = a.workdir or Path(tempfile.mkdtemp(prefix="curation-quality-"))
    query_classes = ("3", "7")
    photos = _photos(a.photos)
    tp = root / "truth.json"
    if tp.is_file():
        truth = json.loads(tp.read_text())
    else:
        truth = build(root, photos, a.seed, a.copies_per_family, n_exact=30, n_eval=100,
                      query_classes=query_classes, n_query=24, n_pool=a.n_pool)
        tp.write_text(json.dumps(truth))
    print(f"crawl: {len(truth)} items from {len(photos)} photos in {root}")
    rows = []
    for desc in a.descriptor:
        for wh, vf in [(w, v) for w in a.whitening for v in a.verify]:
            r = run_one(root, desc, a.seed, a.image_size, wh, vf == "on", extra=tuple(a.set))
            q = score(r["out"], truth, query_classes)
            cal = {st: json.loads((r["out"] / "calibrate" / f"{st}.json").read_text())
                   for st in ("dedup", "decontaminate")}  # with the timings summary.json leaves out
            if a.explicit_rerun:
                r["explicit"] = run_one(root, desc, a.seed, a.image_size, wh, vf == "on", explicit=cal, extra=tuple(a.set))
            rows.append((desc + (f" + {wh}" if wh != "none" else "") + (" + verify" if vf == "on" else ""), q, r, cal))
    embeds = [r["timings"]["embed"] for *_, r, _ in rows if r["timings"]["embed"] > 1.0] or [float("nan")]
    print("\n| measure | " + " | ".join(f"`{d}`" for d, *_ in rows) + " |")
    print("|---|" + "---|" * len(rows))

    def line(name, fn):
        print(f"| {name} | " + " | ".join(fn(q, r, c) for _, q, r, c in rows) + " |")

    line("dedup threshold (calibrated) / est. precision", lambda q, r, c: f"{c['dedup']['threshold']:.3f} / {c['dedup'].get('estimated_precision', float('nan')):.3f}")
    line("decontam threshold (calibrated) / est. precision", lambda q, r, c: f"{c['decontaminate']['threshold']:.3f} / {c['decontaminate'].get('estimated_precision', float('nan')):.3f}")
    def verify_cell(rec):
        v = rec.get("verify")
        return "—" if not v else (f"{v['min_inliers']}, r ≥ {v.get('min_correlation', float('nan')):.2f} "
                                  f"({v.get('estimated_precision', float('nan')):.3f} / "
                                  f"{v.get('estimated_recall', float('nan')):.3f}; {v.get('seconds', 0):.0f} s)")

    line("dedup verify.min_inliers, min_correlation, calibrated (est. precision / recall; time)",
         lambda q, r, c: verify_cell(c["dedup"]))
    line("decontam verify.min_inliers, min_correlation, calibrated (est. precision / recall; time)",
         lambda q, r, c: verify_cell(c["decontaminate"]))
    for fam in ("exact", *FAMILIES):
        line(f"recall: {fam}", lambda q, r, c, f=fam: f"{q['families'][f][0]:.3f} (n={q['families'][f][1]})")
    def dedup_stats(r):
        st = json.loads(layout.stats_path(layout.dedup_decisions(r["out"])).read_text())
        return (f"{st.get('verify_pairs', 0)} / {st.get('verified_edges', 0)} / {st.get('verify_s', 0):.1f} s"
                if "verify_pairs" in st else "—")

    line("dedup verification: pairs / edges added / time", lambda q, r, c: dedup_stats(r))
    line("near-copy recall, overall", lambda q, r, c: f"{q['near_recall_overall']:.3f}")
    line("precision of dedup drops", lambda q, r, c: f"{q['dedup_precision']:.3f} ({q['dedup_dropped']} dropped)")
    line("eval-copy recall / precision", lambda q, r, c: f"{q['eval_recall']:.3f} / {q['eval_precision']:.3f} ({q['eval_dropped']} dropped)")
    line("query-class share raw → curated", lambda q, r, c: f"{q['raw_share']:.3f} → {q['curated_share']:.3f} ({q['selected']}/{q['candidates']})")
    line("retrieval method (why)", lambda q, r, c: "; ".join(f"{v['method']}" for v in r["summary"]["retrieval"]["per_set"].values()))
    for st in ("embed", "dedup", "decontaminate", "retrieve", "write"):
        line(f"time: {st} (s)", lambda q, r, c, s=st: f"{r['timings'][s]:.1f}")
    line("time: calibration inside dedup + decontam (s)",
         lambda q, r, c: f"{c['dedup'].get('seconds', 0) + c['decontaminate'].get('seconds', 0):.1f}")
    line("calibration / (embed + dedup without it)", lambda q, r, c: "{:.1%}".format(
        (c['dedup'].get('seconds', 0) + c['decontaminate'].get('seconds', 0))
        / (r['timings']['embed'] + r['timings']['dedup'] - c['dedup'].get('seconds', 0))))
    if a.explicit_rerun:
        both = lambda r: r["timings"]["dedup"] + r["timings"]["decontaminate"]
        line("time: dedup + decontam, calibrated / values given (s)",
             lambda q, r, c: f"{both(r):.1f} / {both(r['explicit']):.1f}")
        line("calibration's added time / (embed + dedup, values given)", lambda q, r, c: "{:.1%}".format(
            (both(r) - both(r["explicit"])) / (embeds[0] + r["explicit"]["timings"]["dedup"])))
    for _, q, r, c in rows:
        print(json.dumps({"calibration": c, "retrieval": r["summary"]["retrieval"]}, default=str)[:3000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
