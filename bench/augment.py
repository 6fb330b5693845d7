"""Decode + DINOv2 multi-crop (2 x 224 + 8 x 98) throughput per thread on real JPEG photos.

Baseline, measured in the same run: the reference-style pipeline of torchvision v1 PIL transforms
(RandomResizedCrop bicubic, flip, ColorJitter, grayscale, GaussianBlur(9), solarize, ToTensor,
Normalize), each crop composed separately, after a plain PIL decode.
Ours: ``DataAugmentationDINO`` with per-sample seeded parameters, draft JPEG decoding, crop+resize
in one PIL call, colour ops on the crop, fused to-tensor + normalise.

    .venv/bin/python bench/augment.py [--seconds 6] [--sign-digits ../shared/data/sign-digits]
"""
from __future__ import annotations

import argparse
import io
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.data.augment import DataAugmentationDINO


def sample_photos(target_side: int) -> list[bytes]:
    """scikit-image / scikit-learn sample photos re-encoded as JPEG with the long side = target."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    arrays += list(load_sample_images().images)
    out = []
    for a in arrays:
        img = Image.fromarray(a).convert("RGB")
        s = target_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def reference_pipeline(global_size=224, local_size=98, n_local=8):
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    jitter = T.Compose([
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ])
    norm = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])

    def blur(p):
        return T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    g1 = T.Compose([T.RandomResizedCrop(global_size, (0.32, 1.0), interpolation=bicubic), jitter, blur(1.0), norm])
    g2 = T.Compose([T.RandomResizedCrop(global_size, (0.32, 1.0), interpolation=bicubic), jitter, blur(0.1),
                    T.RandomSolarize(128, p=0.2), norm])
    lo = T.Compose([T.RandomResizedCrop(local_size, (0.05, 0.32), interpolation=bicubic), jitter, blur(0.5), norm])

    def run(data: bytes):
        img = Image.open(io.BytesIO(data)).convert("RGB")
        return [g1(img), g2(img)] + [lo(img) for _ in range(n_local)]

    return run


def ours_pipeline():
    aug = DataAugmentationDINO()
    counter = [0]

    def run(data: bytes):
        counter[0] += 1
        return aug(aug.decode(data), np.random.default_rng([0, counter[0]]))

    return run


def compare(fns: dict, photos: list[bytes], seconds: float) -> dict[str, tuple[float, float]]:
    """(wall images/s, CPU images/s) of each pipeline, measured in alternating short rounds so that
    load changes on a shared machine hit all pipelines alike.  CPU time (``process_time``, one
    thread) is the steadier measure when other jobs share the cores."""
    for fn in fns.values():
        fn(photos[0])  # warm-up
    wall = dict.fromkeys(fns, 0.0)
    cpu = dict.fromkeys(fns, 0.0)
    done = dict.fromkeys(fns, 0)
    while min(wall.values()) < seconds:
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for data in photos:
                fn(data)
            wall[name] += time.perf_counter() - w0
            cpu[name] += time.process_time() - c0
            done[name] += len(photos)
    return {name: (done[name] / wall[name], done[name] / cpu[name]) for name in fns}


def resume_skip_rate(photo_files: list[Path], n_skip: int) -> tuple[float, int]:
    """Samples per second that a resuming stream fast-forwards (tar headers only, no decoding)."""
    import tempfile

    from dinov2.data.shards import write_shard
    from dinov2.data.webdataset import SampleStream

    with tempfile.TemporaryDirectory() as tmp:
        per = -(-len(photo_files) // 8)
        shards = []
        for s in range(8):
            members = [(f"sd/{f.parent.name}.{f.stem}.jpg", f.read_bytes()) for f in photo_files[s * per : (s + 1) * per]]
            shards.append(f"{tmp}/sd-{s:02d}.tar")
            write_shard(shards[-1], members)
        stream = SampleStream([shards], [1.0], seed=0, slot=0, num_slots=1, shuffle_buffer=1000)
        start = time.perf_counter()
        stream.skip(n_skip)
        return n_skip / (time.perf_counter() - start), len(photo_files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="time per measurement")
    ap.add_argument("--sign-digits", default=str(Path(__file__).resolve().parents[2] / "shared/data/sign-digits"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-thread numbers: a DataLoader worker runs one thread

    sets = {
        "sample photos ~400 px": sample_photos(400),
        "sample photos ~1200 px": sample_photos(1200),
    }
    sd = Path(args.sign_digits)
    if sd.is_dir():
        files = sorted(sd.glob("*/*.JPG"))[::100][:20]
        sets["sign-digits 100 px"] = [f.read_bytes() for f in files]
    else:
        print(f"(sign-digits not found at {sd}: skipped)")

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread")
    print("| images | reference img/s (wall / cpu) | ours img/s (wall / cpu) | ratio (wall / cpu) |")
    print("|---|---|---|---|")
    for name, photos in sets.items():
        rates = compare({"ref": reference_pipeline(), "ours": ours_pipeline()}, photos, args.seconds)
        (rw, rc), (ow, oc) = rates["ref"], rates["ours"]
        print(f"| {name} ({len(photos)} JPEGs) | {rw:.1f} / {rc:.1f} | {ow:.1f} / {oc:.1f} | "
              f"{ow / rw:.2f}x / {oc / rc:.2f}x |", flush=True)
    if sd.is_dir():
        rate, n = resume_skip_rate(sorted(sd.glob("*/*.JPG")), 20000)
        print(f"\nresume fast-forward (8 shards, {n} photos, buffer 1000, 20,000 samples skipped): "
              f"{rate:,.0f} samples/s skipped without decoding")


if __name__ == "__main__":
    main()
