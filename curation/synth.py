"""Build a small, realistic "uncurated crawl" from real photographs.

Used by the demo and by tests that measure dedup/decontamination precision and
recall: every generated crawl image carries ground truth (which base image it
derives from and how), written to ``truth.json``.

Layout written under ``out_dir``::

    crawl/00000.tar …      img2dataset-style shards: 000000000.jpg + .json + .txt
    crawl/00000_stats.json
    eval/<photo>/<i>.jpg   evaluation set (the crawl holds near-copies of some of these)
    query/<i>.jpg          curated query set (crops of a subset of the photos)
    heldout/{train,val}/<photo>/<i>.jpg   instance-labelled set for k-NN evaluation
    truth.json

Everything is a deterministic function of the photos and the seed.
"""
from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from dinov2.data.shards import ShardWriter, is_image_ext
from dinov2.utils.io import atomic_write_bytes, atomic_write_json

# scikit-image photos that ship inside the wheel (no download). Pure textures (brick, grass, gravel)
# are left out: any two crops of a texture are near-duplicates, which would blur the ground truth.
_SKIMAGE_PHOTOS = (
    "astronaut", "camera", "chelsea", "clock", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "retina", "rocket", "cell", "colorwheel",
)


def load_photos(folder: str | Path | None = None, max_side: int = 640, limit: int | None = None):
    """Return ``[(name, RGB PIL image)]``: the photos in ``folder`` or the packaged sample photos."""
    photos: list[tuple[str, Image.Image]] = []
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"photo folder not found: {folder}")
        for path in sorted(p for p in folder.rglob("*") if is_image_ext(p.suffix.lstrip("."))):
            try:
                with Image.open(path) as im:
                    img = ImageOps.exif_transpose(im).convert("RGB")
            except Exception:  # noqa: BLE001 - unreadable seed photos are skipped
                continue
            name = str(path.relative_to(folder).with_suffix("")).replace("/", "__")
            photos.append((name, img))
            if limit is not None and len(photos) >= limit:
                break
        if not photos:
            raise ValueError(f"no readable images under {folder}")
    else:
        import matplotlib.cbook
        import skimage.data
        from sklearn.datasets import load_sample_images

        for name in _SKIMAGE_PHOTOS:
            arr = getattr(skimage.data, name)()
            photos.append((name, Image.fromarray(arr).convert("RGB")))
        left, _right, _disp = skimage.data.stereo_motorcycle()  # the right view is a near-copy: skip it
        photos.append(("motorcycle", Image.fromarray(left).convert("RGB")))
        sk = load_sample_images()
        for fname, arr in zip(sk.filenames, sk.images):
            photos.append((Path(fname).stem, Image.fromarray(arr).convert("RGB")))
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            photos.append(("grace_hopper", Image.open(f).convert("RGB")))
        if limit is not None:
            photos = photos[:limit]
    out = []
    for name, img in photos:
        scale = max_side / max(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        out.append((name, img))
    return out


@dataclass
class CrawlSpec:
    n_base: int = 600  # distinct base images (random crops of the photos)
    exact_dup_rate: float = 0.08  # extra byte-identical copies, as a fraction of n_base
    near_dup_rate: float = 0.15  # extra near copies (re-encode, resize, crop, flip, colour)
    n_eval_per_photo: int = 3  # evaluation images per photo
    eval_copy_rate: float = 0.5  # fraction of eval images planted (near-copied) into the crawl
    n_query_photos: int = 0  # photos the query set draws from (0: a third of them)
    n_query_per_photo: int = 6
    n_heldout_per_photo: int = 8  # per split (train and val)
    n_junk: int = 12  # corrupt, truncated, zero-byte, non-image
    images_per_shard: int = 256
    min_out_side: int = 128
    max_out_side: int = 320


def _random_crop(rng: np.random.Generator, img: Image.Image, spec: CrawlSpec, scale=(0.04, 0.4),
                 boxes: list | None = None) -> Image.Image:
    """A random crop resized to the crawl's sizes; its box in photo pixels is appended to ``boxes``."""
    w, h = img.size
    for _ in range(20):
        area = rng.uniform(*scale) * w * h
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round(np.sqrt(area * ratio))), int(round(np.sqrt(area / ratio)))
        if 8 <= cw <= w and 8 <= ch <= h:
            break
    else:
        cw, ch = w, h
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = img.crop((x0, y0, x0 + cw, y0 + ch))
    if boxes is not None:
        boxes.append([x0, y0, x0 + cw, y0 + ch])
    side = int(rng.integers(spec.min_out_side, spec.max_out_side + 1))
    s = side / max(cw, ch)
    return crop.resize((max(8, round(cw * s)), max(8, round(ch * s))), Image.BICUBIC)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def near_copy(rng: np.random.Generator, img: Image.Image) -> tuple[Image.Image, str]:
    """A near-duplicate of ``img``: one or two of re-encode, resize, crop, flip, colour change."""
    kinds = ["reencode", "resize", "crop", "flip", "color"]
    chosen = list(rng.choice(kinds, size=int(rng.integers(1, 3)), replace=False))
    out = img
    for kind in chosen:
        if kind == "resize":
            s = rng.uniform(0.5, 0.85)
            out = out.resize((max(8, round(out.width * s)), max(8, round(out.height * s))), Image.BICUBIC)
        elif kind == "crop":
            f = rng.uniform(0.85, 0.95)
            cw, ch = round(out.width * f), round(out.height * f)
            x0, y0 = int(rng.integers(0, out.width - cw + 1)), int(rng.integers(0, out.height - ch + 1))
            out = out.crop((x0, y0, x0 + cw, y0 + ch))
        elif kind == "flip":
            out = ImageOps.mirror(out)
        elif kind == "color":
            out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.9, 1.1))
            out = ImageEnhance.Color(out).enhance(rng.uniform(0.85, 1.15))
        elif kind == "reencode":
            out = Image.open(io.BytesIO(_jpeg(out, int(rng.integers(40, 70))))).convert("RGB")
    return out, "+".join(chosen)


def _junk(rng: np.random.Generator, i: int, sample_jpeg: bytes) -> tuple[str, bytes, str]:
    kind = ("corrupt", "truncated", "empty", "text")[i % 4]
    if kind == "corrupt":
        return "jpg", bytes(rng.integers(0, 256, size=2048, dtype=np.uint8)), kind
    if kind == "truncated":
        return "jpg", sample_jpeg[: len(sample_jpeg) // 3], kind
    if kind == "empty":
        return "jpg", b"", kind
    return "jpg", b"<html><body>404 Not Found</body></html>", kind


def build_crawl(photos, out_dir: str | Path, spec: CrawlSpec | None = None, seed: int = 0) -> dict:
    """Write the crawl, eval, query and held-out sets under ``out_dir``; return the truth dict."""
    spec = spec or CrawlSpec()
    if not 0 < spec.images_per_shard <= 10_000:
        raise ValueError("images_per_shard must be in 1..10000 (img2dataset keys are shard*10^4 + index)")
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    n_photos = len(photos)
    if n_photos < 2:
        raise ValueError("need at least two photos")

    items: list[dict] = []  # each: bytes, ext, kind, group, photo, transform

    def add(img_or_bytes, kind, group, photo, transform, quality=None, box=None):
        data = img_or_bytes if isinstance(img_or_bytes, bytes) else _jpeg(img_or_bytes, quality or int(rng.integers(75, 96)))
        # box: the photo region shown (curation/truth.py counts overlapping crops of a photo as one source)
        items.append(dict(data=data, ext="jpg", kind=kind, group=group, photo=photo, transform=transform, box=box))
        return data

    # Base images: random crops, spread evenly over the photos.
    base: list[tuple[Image.Image, int, str]] = []
    for g in range(spec.n_base):
        p = g % n_photos
        name, img = photos[p]
        boxes: list = []
        crop = _random_crop(rng, img, spec, boxes=boxes)
        add(crop, "unique", g, name, "random_crop", box=boxes[0])
        base.append((crop, g, name))
    # Exact copies: the same bytes again (img2dataset fetching the same file from two URLs).
    n_exact = int(round(spec.exact_dup_rate * spec.n_base))
    for g in rng.choice(spec.n_base, size=n_exact, replace=False):
        items.append(dict(items[int(g)], kind="exact_dup"))
    # Near copies.
    n_near = int(round(spec.near_dup_rate * spec.n_base))
    for g in rng.choice(spec.n_base, size=n_near, replace=False):
        crop, gid, name = base[int(g)]
        copy, how = near_copy(rng, crop)
        add(copy, "near_dup", gid, name, how, box=items[gid]["box"])

    # Evaluation set, and near-copies of some of it planted in the crawl.
    eval_truth = {}
    next_group = spec.n_base
    for p, (name, img) in enumerate(photos):
        for j in range(spec.n_eval_per_photo):
            boxes = []
            crop = _random_crop(rng, img, spec, boxes=boxes)
            rel = f"{name}/{j:03d}.jpg"
            atomic_write_bytes(out_dir / "eval" / rel, _jpeg(crop, 92))
            eval_truth[rel] = {"group": next_group, "photo": name, "planted": False, "box": boxes[0]}
            if rng.random() < spec.eval_copy_rate:
                copy, how = near_copy(rng, crop)
                add(copy, "eval_copy", next_group, name, how, box=boxes[0])
                eval_truth[rel]["planted"] = True
            next_group += 1

    # Query set: crops of a subset of the photos (what retrieval should favour).
    n_query_photos = spec.n_query_photos or max(1, n_photos // 3)
    query_photo_idx = sorted(rng.choice(n_photos, size=n_query_photos, replace=False).tolist())
    query_photos = [photos[i][0] for i in query_photo_idx]
    for i in query_photo_idx:
        name, img = photos[i]
        for j in range(spec.n_query_per_photo):
            atomic_write_bytes(out_dir / "query" / f"{name}__{j:03d}.jpg", _jpeg(_random_crop(rng, img, spec), 92))

    # Instance-labelled held-out set (label = source photo), never in the crawl.
    for split in ("train", "val"):
        for name, img in photos:
            for j in range(spec.n_heldout_per_photo):
                crop = _random_crop(rng, img, spec, scale=(0.15, 0.6))
                atomic_write_bytes(out_dir / "heldout" / split / name / f"{j:03d}.jpg", _jpeg(crop, 90))

    # Junk members: corrupt, truncated, zero-byte, an HTML error page saved as .jpg.
    for i in range(spec.n_junk):
        ext, data, how = _junk(rng, i, items[i % len(items)]["data"])
        items.append(dict(data=data, ext=ext, kind="junk", group=-1, photo=None, transform=how, box=None))

    order = rng.permutation(len(items))
    truth_items = {}
    shard_dir = out_dir / "crawl"
    n_shards = (len(items) + spec.images_per_shard - 1) // spec.images_per_shard
    for s in range(n_shards):
        idx = order[s * spec.images_per_shard : (s + 1) * spec.images_per_shard]
        stats = {"count": len(idx), "successes": 0, "failed_to_download": 0}
        with ShardWriter(shard_dir / f"{s:05d}.tar") as tar:
            for pos, i in enumerate(idx):
                item = items[int(i)]
                key = f"{s:05d}{pos:04d}"
                caption = f"photo of {item['photo'] or 'something'}"
                meta = {
                    "url": f"https://img.example.com/{item['photo'] or 'x'}/{int(i)}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "success",
                    "error_message": None,
                }
                try:
                    with Image.open(io.BytesIO(item["data"])) as im:
                        meta["width"], meta["height"] = im.size
                        meta["original_width"], meta["original_height"] = im.size
                except Exception:  # noqa: BLE001 - junk has no size
                    meta["width"] = meta["height"] = None
                tar.add(f"{key}.{item['ext']}", item["data"])
                tar.add(f"{key}.json", json.dumps(meta).encode())
                tar.add(f"{key}.txt", caption.encode())
                stats["successes"] += 1
                truth_items[key] = {k: item[k] for k in ("kind", "group", "photo", "transform", "box")}
        atomic_write_json(shard_dir / f"{s:05d}_stats.json", stats)

    truth = {
        "seed": seed,
        "spec": asdict(spec),
        "photos": [name for name, _ in photos],
        "query_photos": query_photos,
        "items": truth_items,
        "eval": eval_truth,
    }
    atomic_write_json(out_dir / "truth.json", truth)
    return truth


if __name__ == "__main__":  # pragma: no cover - manual use
    import argparse

    ap = argparse.ArgumentParser(description="build a synthetic uncurated crawl from real photos")
    ap.add_argument("out_dir")
    ap.add_argument("--photos", default=None, help="folder of seed photos (default: packaged sample photos)")
    ap.add_argument("--n-base", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = build_crawl(load_photos(a.photos), a.out_dir, CrawlSpec(n_base=a.n_base), seed=a.seed)
    print(f"wrote {len(t['items'])} crawl items to {a.out_dir}")
