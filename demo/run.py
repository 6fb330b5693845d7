"""The main job end to end (``make demo``): crawl → curate → train → evaluate → report.

1. builds an uncurated img2dataset-style crawl from real photos (packaged sample photos, or
   ``--photos DIR``) with planted exact/near duplicates, eval-set copies and junk;
2. bootstraps a DINOv2 embedder by a short pretraining on the raw crawl (or uses ``--checkpoint``);
3. ``curate run``: embed → dedup → decontaminate → retrieve → write → audit (local executor);
4. trains the tiny config on the curated shards, then a short high-resolution phase;
5. k-NN and linear probe on a held-out labelled set vs the same architecture at random init;
6. writes ``<out>/report/index.html``.

Every step is resumable: rerunning the demo skips what is already complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class DemoSize:
    n_base: int  # distinct base images in the crawl
    images_per_shard: int
    bootstrap_steps: int
    train_steps: int
    highres_steps: int
    heldout_per_photo: int
    batch_size: int
    query_k: int  # pool images retrieved per query image
    balanced_fraction: float  # share of the pool drawn by hierarchical k-means balanced sampling


SIZES = {
    "full": DemoSize(n_base=1600, images_per_shard=250, bootstrap_steps=60, train_steps=150, highres_steps=20,
                     heldout_per_photo=10, batch_size=32, query_k=24, balanced_fraction=0.3),
    "small": DemoSize(n_base=120, images_per_shard=64, bootstrap_steps=6, train_steps=10, highres_steps=3,
                      heldout_per_photo=3, batch_size=8, query_k=8, balanced_fraction=0.3),
}


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.steps: dict[str, float] = {}

    def mark(self, name: str, since: float) -> None:
        self.steps[name] = round(time.perf_counter() - since, 1)


def _banner(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def _run(cmd: list[str], log_path: Path) -> None:
    """Run a CLI step; its output goes to the terminal and to a log file."""
    print("    $ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            log.write(line)
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
        rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"demo: step failed (exit {rc}): {' '.join(cmd)}\n      log: {log_path}")


def _py(*module_args: str) -> list[str]:
    return [sys.executable, "-m", *module_args]


def _shard_pattern(folder: Path, prefix: str, suffix: str = ".tar") -> str:
    names = sorted(p.name for p in folder.glob(f"{prefix}*{suffix}"))
    if not names:
        raise SystemExit(f"demo: no shards {prefix}*{suffix} in {folder}")
    stems = [n[len(prefix): -len(suffix)] for n in names]
    width = len(stems[0])
    if len(stems) == 1:
        return str(folder / names[0])
    return str(folder / f"{prefix}{{{stems[0]}..{stems[-1]}}}{suffix}") if all(len(s) == width for s in stems) \
        else "::".join(str(folder / n) for n in names)


def train_overrides(run_dir: Path, pattern: str, size: DemoSize, steps: int, heldout: Path) -> list[str]:
    return [
        f"train.output_dir={run_dir}",
        f"data.sources=[{{pattern: '{pattern}'}}]",
        f"data.batch_size={size.batch_size}",
        f"optim.max_steps={steps}",
        f"optim.epoch_length={max(10, steps // 6)}",
        f"checkpoint.every_n_steps={max(5, steps // 3)}",
        f"eval.train_dir={heldout / 'train'}",
        f"eval.val_dir={heldout / 'val'}",
        # The reference position init: on these diverse photos it learns at once, and the instance
        # probe gains more with it (k-NN 92.9 % / linear 93.5 % vs 91.2 % / 80.0 % with tiny.yaml's
        # sin-cos start, which is there for homogeneous data; bench/RESULTS.md, session 5).
        "model.pos_embed_init=trunc_normal",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    ap.add_argument("--photos", default=None, help="folder of seed photos (default: packaged sample photos)")
    ap.add_argument("--labeled", default=None,
                    help="labelled folder (class subfolders) for evaluation instead of the instance-label set")
    ap.add_argument("--checkpoint", default=None, help="DINOv2 backbone weights for curation (skips the bootstrap)")
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from curation import layout
    from curation.synth import CrawlSpec, build_crawl, load_photos

    size = SIZES[args.size]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    timer = Timer()

    _banner("1/6 building the uncurated crawl from real photos")
    t = time.perf_counter()
    data = out / "data"
    if not (data / "truth.json").exists():
        photos = load_photos(args.photos)
        spec = CrawlSpec(n_base=size.n_base, images_per_shard=size.images_per_shard,
                         n_heldout_per_photo=size.heldout_per_photo)
        truth = build_crawl(photos, data, spec, seed=args.seed)
    else:
        truth = json.loads((data / "truth.json").read_text())
    print(f"    {len(truth['items'])} crawl images from {len(truth['photos'])} photos in {data / 'crawl'}")
    timer.mark("crawl", t)
    heldout = data / "heldout"
    if args.labeled:
        heldout = split_labeled_folder(Path(args.labeled).resolve(), out / "labeled_split", seed=args.seed)
    crawl_pattern = _shard_pattern(data / "crawl", "")

    _banner("2/6 bootstrapping a DINOv2 embedder on the raw crawl")
    t = time.perf_counter()
    if args.checkpoint:
        embedder_ckpt = Path(args.checkpoint).resolve()
        print(f"    using {embedder_ckpt}")
    else:
        boot = out / "bootstrap"
        embedder_ckpt = boot / "backbone.pth"
        if not embedder_ckpt.exists():
            _run(_py("dinov2.cli", "train", "-c", str(REPO / "configs/train/tiny.yaml"),
                     *train_overrides(boot, crawl_pattern, size, size.bootstrap_steps, heldout)), logs / "bootstrap.log")
            _run(_py("dinov2.cli", "export", str(boot), str(embedder_ckpt)), logs / "bootstrap.log")
    timer.mark("bootstrap", t)

    _banner("3/6 curating: embed → dedup → decontaminate → retrieve → write → audit")
    t = time.perf_counter()
    curated = out / "curated"
    _run(_py("curation.cli", "run", "-c", str(REPO / "configs/curation/demo.yaml"),
             f"output_dir={curated}",
             f"inputs=[{data / 'crawl'}/*.tar]",
             f"eval_sets.photos=[{data / 'eval'}]",
             f"query_sets.photos.inputs=[{data / 'query'}]",
             f"embedders.dino.checkpoint={embedder_ckpt}",
             # CLS + mean patch token: more image content than the CLS alone of a briefly trained model.
             "embedders.dino.pooling=cls_avgpool",
             # Sample-based retrieval (k nearest pool images per query image) plus hierarchical k-means
             # balanced sampling of the pool (Vo et al. 2024); the curated set is their union.
             "query_sets.photos.method=sample", f"query_sets.photos.k={size.query_k}",
             "retrieve.hkmeans.enabled=true", f"retrieve.hkmeans.target_fraction={size.balanced_fraction}",
             f"seed={args.seed}"), logs / "curate.log")
    timer.mark("curate", t)

    _banner("4/6 training the tiny config on the curated shards (+ high-resolution phase)")
    t = time.perf_counter()
    run = out / "train"
    curated_pattern = _shard_pattern(layout.final_dir(curated), "lvd-")
    _run(_py("dinov2.cli", "train", "-c", str(REPO / "configs/train/tiny.yaml"),
             *train_overrides(run, curated_pattern, size, size.train_steps, heldout),
             f"phases.highres.steps={size.highres_steps}"), logs / "train.log")
    timer.mark("train", t)

    _banner("5/6 evaluating: k-NN and linear probe vs random init")
    t = time.perf_counter()
    results = evaluate(run, heldout, out / "eval.json")
    timer.mark("eval", t)

    _banner("6/6 writing the report")
    t = time.perf_counter()
    from demo.report import write_report
    from dinov2.cli import load_backbone_weights
    from dinov2.data.decode import decode_image

    samples = [decode_image(p.read_bytes()).image for p in _sample_images(heldout / "val", 6)]
    runs = {"bootstrap": out / "bootstrap", "train": run} if not args.checkpoint else {"train": run}
    index = write_report(out / "report", data_dir=data, curated_dir=curated, run_dirs=runs, eval_results=results,
                         truth=truth, timings=timer.steps, model=load_backbone_weights(run).eval(),
                         sample_images=samples, image_size=112)
    timer.mark("report", t)
    total = time.perf_counter() - timer.t0
    head = results["trained"]
    base = results["random init"]
    from curation.funnel import ordered_funnel

    funnel = ordered_funnel(json.loads(layout.summary(curated).read_text())["funnel"])
    print(f"\nDone in {total / 60:.1f} min.  Report: {index}")
    print("funnel: " + " → ".join(f"{k} {v}" for k, v in funnel.items()))
    print(f"k-NN top-1 (k=20): trained {100 * head['knn_top1_k20']:.1f}% vs random init "
          f"{100 * base['knn_top1_k20']:.1f}%;  linear: {100 * head.get('linear_top1', float('nan')):.1f}% vs "
          f"{100 * base.get('linear_top1', float('nan')):.1f}%")
    return 0


def evaluate(run_dir: Path, heldout: Path, out_json: Path) -> dict[str, dict[str, float]]:
    """k-NN + linear probe of the trained teacher and of the same architecture at random init."""
    import argparse as _ap

    import torch

    from dinov2.cli import load_backbone_weights
    from dinov2.eval.linear import LinearProbeConfig
    from dinov2.eval.run import evaluate_backbone
    from dinov2.train.config import load_train_config
    from dinov2.utils.io import atomic_write_json

    cfg = load_train_config(run_dir / "config.yaml")
    trained = load_backbone_weights(run_dir)
    torch.manual_seed(0)
    random_init = _fresh_like(trained, cfg.model.pos_embed_init)  # same architecture, grid and init
    ecfg = _ap.Namespace(train_dir=str(heldout / "train"), val_dir=str(heldout / "val"),
                         resize_size=cfg.eval.resize_size, crop_size=cfg.eval.crop_size,
                         batch_size=cfg.eval.batch_size, num_workers=0, ks=[10, 20], temperature=0.07, linear=True)
    lin = LinearProbeConfig(epochs=60)
    results = {}
    cache: dict = {}
    for name, model in (("trained", trained), ("random init", random_init)):
        model.eval()
        results[name] = evaluate_backbone(model, ecfg, "cpu", cache=cache, linear_cfg=lin)
        print(f"    {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in sorted(results[name].items())))
    atomic_write_json(out_json, results)
    return results


def _sample_images(folder: Path, n: int) -> list[Path]:
    """The first image of each of the first ``n`` classes (sorted): a varied, stable pick."""
    picks = []
    for cls in sorted(d for d in folder.iterdir() if d.is_dir()):
        files = sorted(cls.iterdir())
        if files:
            picks.append(files[0])
        if len(picks) == n:
            break
    return picks


def _fresh_like(model, pos_embed_init: str):
    """A freshly initialised copy of ``model`` (same hyper-parameters, the run's position init).

    A backbone read back from a checkpoint does not know how its position table was started, so the
    run's ``model.pos_embed_init`` is passed in: the baseline is what training started from.
    """
    import copy

    fresh = copy.deepcopy(model)
    fresh.pos_embed_init = pos_embed_init
    fresh.init_weights()
    return fresh


def split_labeled_folder(src: Path, dst: Path, seed: int = 0, val_fraction: float = 0.5) -> Path:
    """Split a class-subfolder image folder into ``dst/{train,val}/<class>/`` (symlinks, per-class, seeded)."""
    import random

    if not src.is_dir():
        raise SystemExit(f"demo: labelled folder not found: {src}")
    from dinov2.data.shards import is_image_ext

    classes = sorted(d for d in src.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise SystemExit(f"demo: {src} needs at least two class subfolders")
    for cls in classes:
        files = sorted(p for p in cls.rglob("*") if is_image_ext(p.suffix.lstrip(".")))
        random.Random(f"{seed}/{cls.name}").shuffle(files)
        n_val = max(1, int(len(files) * val_fraction))
        for split, part in (("val", files[:n_val]), ("train", files[n_val:])):
            folder = dst / split / cls.name
            folder.mkdir(parents=True, exist_ok=True)
            for f in part:
                link = folder / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return dst


if __name__ == "__main__":
    sys.exit(main())
