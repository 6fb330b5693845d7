"""Decode + DINOv2 multi-crop (2 x 224 + 8 x 98) per CPU-second on one thread, against the reference.

Pipelines, timed in alternating rounds in one process (so load changes hit all alike):
- ``faithful``: :class:`dinov2.data.augment_reference.ReferenceMultiCrop` — the reference's own
  torchvision v1 transforms, order, probabilities (blur as its code applies it) and PIL decode;
- ``reference``: the real ``DataAugmentationDINO`` + ``ImageDataDecoder`` of a checkout of the public
  reference, when ``--reference-dir`` points at one (imported from there; not shipped);
- ``ours``: :class:`DataAugmentationDINO` uint8 crops + the once-per-batch normalisation, default
  config (intended blur probabilities) and with the reference's blur probabilities (``ours-refblur``);
- ``ours-cpu-part``: what the CPU still does when colour ops run on the GPU (decode + crop only).
Then a per-operation profile (CPU ms per image) of faithful/reference and ours.

    .venv/bin/python bench/augment.py [--seconds 6] [--reference-dir DIR] [--sign-digits DIR]
"""
from __future__ import annotations

import argparse
import importlib
import io
import platform
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinov2.data import colour
from dinov2.data.augment import CropsConfig, DataAugmentationDINO
from dinov2.data.augment_reference import REFERENCE_BLUR_P, ReferenceMultiCrop, reference_decode

OPS = ("decode", "crop+resize", "flip", "colour jitter", "grayscale", "blur", "solarize", "to-tensor+normalise")


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


def load_reference(ref_dir: str):
    """(DataAugmentationDINO class, decode function) from a reference checkout, without running its
    package ``__init__`` (which pulls in the datasets and the trainer)."""
    data_dir = Path(ref_dir) / "dinov2" / "data"
    if not (data_dir / "augmentations.py").is_file():
        raise SystemExit(f"error: {ref_dir} has no dinov2/data/augmentations.py")
    pkg = types.ModuleType("_reference_data")
    pkg.__path__ = [str(data_dir)]
    sys.modules["_reference_data"] = pkg
    sub = types.ModuleType("_reference_data.datasets")
    sub.__path__ = [str(data_dir / "datasets")]
    sys.modules["_reference_data.datasets"] = sub
    aug = importlib.import_module("_reference_data.augmentations")
    dec = importlib.import_module("_reference_data.datasets.decoders")
    return aug.DataAugmentationDINO, lambda data: dec.ImageDataDecoder(data).decode()


# ---- per-operation timing of torchvision Compose pipelines ---------------------------------------
def _op_name(t) -> str | None:
    inner = t.transforms[0] if isinstance(t, T.RandomApply) and len(t.transforms) == 1 else t
    for cls, name in ((T.RandomResizedCrop, "crop+resize"), (T.RandomHorizontalFlip, "flip"),
                      (T.ColorJitter, "colour jitter"), (T.RandomGrayscale, "grayscale"),
                      (T.GaussianBlur, "blur"), (T.RandomSolarize, "solarize"), (T.ToTensor, "to-tensor+normalise"),
                      (T.Normalize, "to-tensor+normalise")):
        if isinstance(inner, cls):
            return name
    return None


class _Timed:
    def __init__(self, t, name, acc):
        self.t, self.name, self.acc = t, name, acc

    def __call__(self, x):
        c0 = time.process_time()
        y = self.t(x)
        self.acc[self.name] += time.process_time() - c0
        return y


def instrument(aug, acc) -> None:
    """Wrap every leaf transform of ``aug``'s Compose pipelines in a CPU timer (each once)."""
    seen: set[int] = set()

    def walk(comp):
        if id(comp) in seen:
            return
        seen.add(id(comp))
        for i, t in enumerate(comp.transforms):
            if isinstance(t, T.Compose):
                walk(t)
            elif (name := _op_name(t)) is not None:
                comp.transforms[i] = _Timed(t, name, acc)

    for v in vars(aug).values():
        if isinstance(v, T.Compose):
            walk(v)


# ---- pipelines --------------------------------------------------------------------------------
def torchvision_pipeline(aug_cls, decode, acc=None):
    aug = aug_cls(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=8,
                  global_crops_size=224, local_crops_size=98)
    if acc is not None:
        instrument(aug, acc)

    def run(data: bytes):
        c0 = time.process_time()
        img = decode(data)
        if acc is not None:
            acc["decode"] += time.process_time() - c0
        return aug(img)

    return run


def ours_pipeline(cfg: CropsConfig, photometric: bool = True, acc=None):
    aug = DataAugmentationDINO.from_config(cfg)
    counter = [0]

    def timed(name, fn, *a):
        c0 = time.process_time()
        out = fn(*a)
        acc[name] += time.process_time() - c0
        return out

    def run(data: bytes):
        counter[0] += 1
        rng = np.random.default_rng([0, counter[0]])
        if acc is None:
            img = aug.decode(data)
            out = aug.crops_uint8(img, rng, photometric)
            if photometric:  # the collate's once-per-batch normalisation, per image's share
                aug.normalize(out["global_crops"])
                aug.normalize(out["local_crops"])
            return out
        img = timed("decode", aug.decode, data)
        params = aug.sample_params(rng, img.width, img.height)
        crops = []
        for p in params:
            crop = timed("crop+resize", aug.crop_resize, img, p)
            crop = timed("to-tensor+normalise", np.asarray, crop)  # PIL → numpy (one copy)
            for name, on, fn in (
                ("flip", p.flip, lambda c, p: cv2.flip(c, 1)),
                ("colour jitter", p.jitter, lambda c, p: colour.color_jitter(
                    c, p.jitter_order, p.brightness, p.contrast, p.saturation, p.hue)),
                ("grayscale", p.grayscale, lambda c, p: colour.grayscale(c)),
                ("blur", p.blur, lambda c, p: colour.gaussian_blur(c, p.sigma)),
                ("solarize", p.solarize, lambda c, p: colour.solarize(c, aug.cfg.solarize_threshold)),
            ):
                if on:
                    crop = timed(name, fn, crop, p)
            crops.append(crop)
        by_size = defaultdict(list)
        for c in crops:
            by_size[c.shape[:2]].append(c)
        for group in by_size.values():
            timed("to-tensor+normalise", lambda g: aug.normalize([aug.to_uint8(c) for c in g]), group)

    return run


def compare(fns: dict, photos: list[bytes], seconds: float) -> dict[str, float]:
    """CPU images/s (``process_time``, one thread) per pipeline, in alternating rounds of the same
    images until the slowest pipeline has used ``seconds``."""
    for fn in fns.values():
        fn(photos[0])  # warm-up
    cpu = dict.fromkeys(fns, 0.0)
    done = dict.fromkeys(fns, 0)
    while max(cpu.values()) < seconds:
        for name, fn in fns.items():
            c0 = time.process_time()
            for data in photos:
                fn(data)
            cpu[name] += time.process_time() - c0
            done[name] += len(photos)
    return {name: done[name] / cpu[name] for name in fns}


def profile(makers: dict, photos: list[bytes], rounds: int) -> dict[str, dict[str, float]]:
    """CPU ms per image for each op of each pipeline (alternating rounds)."""
    accs = {name: defaultdict(float) for name in makers}
    fns = {name: make(accs[name]) for name, make in makers.items()}
    for _ in range(rounds):
        for fn in fns.values():
            for data in photos:
                fn(data)
    n = rounds * len(photos)
    return {name: {op: 1000.0 * acc[op] / n for op in OPS} for name, acc in accs.items()}


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
    ap.add_argument("--seconds", type=float, default=6.0, help="CPU seconds of the slowest pipeline per photo set")
    ap.add_argument("--reference-dir", help="checkout of the public reference repository (optional)")
    ap.add_argument("--sign-digits", default=str(Path(__file__).resolve().parents[2] / "shared/data/sign-digits"))
    ap.add_argument("--profile-rounds", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)  # per-thread numbers: a DataLoader worker runs one thread

    sets = {"sample photos ~400 px": sample_photos(400), "sample photos ~1200 px": sample_photos(1200)}
    sd = Path(args.sign_digits)
    if sd.is_dir():
        sets["sign-digits 100 px"] = [f.read_bytes() for f in sorted(sd.glob("*/*.JPG"))[::100][:20]]
    else:
        print(f"(sign-digits not found at {sd}: skipped)")

    ref_cls = ref_decode = None
    if args.reference_dir:
        ref_cls, ref_decode = load_reference(args.reference_dir)
    refblur = CropsConfig(blur_p_global1=REFERENCE_BLUR_P[0], blur_p_global2=REFERENCE_BLUR_P[1],
                          blur_p_local=REFERENCE_BLUR_P[2])
    makers = {"faithful": lambda acc=None: torchvision_pipeline(ReferenceMultiCrop, reference_decode, acc)}
    if ref_cls is not None:
        makers["reference"] = lambda acc=None: torchvision_pipeline(ref_cls, ref_decode, acc)
    makers["ours"] = lambda acc=None: ours_pipeline(CropsConfig(), True, acc)
    makers["ours-refblur"] = lambda acc=None: ours_pipeline(refblur, True, acc)
    base = "reference" if ref_cls is not None else "faithful"

    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread; "
          f"loadavg at start: {Path('/proc/loadavg').read_text().split()[:3]}")
    names = list(makers) + ["ours-cpu-part"]
    print("| images | " + " | ".join(f"{n} img/CPU-s" for n in names) + f" | ours ÷ {base} | ours-refblur ÷ {base} |")
    print("|---|" + "---|" * (len(names) + 2))
    for set_name, photos in sets.items():
        fns = {n: m() for n, m in makers.items()}
        fns["ours-cpu-part"] = ours_pipeline(CropsConfig(), photometric=False)
        r = compare(fns, photos, args.seconds)
        print(f"| {set_name} ({len(photos)} JPEGs) | " + " | ".join(f"{r[n]:.1f}" for n in names)
              + f" | {r['ours'] / r[base]:.2f}× | {r['ours-refblur'] / r[base]:.2f}× |", flush=True)
    print(f"loadavg after the ratios: {Path('/proc/loadavg').read_text().split()[:3]}")

    photos = sets["sample photos ~400 px"]
    prof = profile(makers, photos, args.profile_rounds)
    print(f"\nper-operation CPU ms per image (sample photos ~400 px, {args.profile_rounds} rounds):")
    print("| op | " + " | ".join(prof) + " |")
    print("|---|" + "---|" * len(prof))
    for op in OPS + ("total",):
        vals = [sum(p.values()) if op == "total" else p[op] for p in prof.values()]
        print(f"| {op} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print(f"loadavg at end: {Path('/proc/loadavg').read_text().split()[:3]}")
    if sd.is_dir():
        rate, n = resume_skip_rate(sorted(sd.glob("*/*.JPG")), 20000)
        print(f"\nresume fast-forward (8 shards, {n} photos, buffer 1000, 20,000 samples skipped): "
              f"{rate:,.0f} samples/s skipped without decoding")


if __name__ == "__main__":
    main()
