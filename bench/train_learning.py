"""Does the tiny config learn for real?  Self-supervised training on sign-digits photos (no labels),
then weighted k-NN on frozen teacher CLS features vs the same architecture at random init.

Split (stratified, seeded): 60 % of each class → SSL training images (labels unused) and the k-NN
memory bank; 40 % → k-NN queries.  Both models are evaluated with the same transform (resize 96 →
center crop 84) and k ∈ {10, 20}.

    .venv/bin/python bench/train_learning.py --steps 600 --out /tmp/learn [KEY=VALUE …]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinov2.eval.features import EvalTransformConfig, extract_features, list_labeled, write_labeled_shards
from dinov2.eval.knn import knn_accuracy
from dinov2.train.checkpoint import load_teacher_backbone_state
from dinov2.train.config import global_crop_size, load_train_config
from dinov2.train.ssl_meta_arch import build_backbone
from dinov2.train.train import run_training


def split(root: Path, seed: int = 0):
    ls = list_labeled(root)
    train, val = [], []
    for c in range(len(ls.classes)):
        items = [i for i in ls.items if i.label == c]
        random.Random(seed + c).shuffle(items)
        cut = int(0.6 * len(items))
        train += items[:cut]
        val += items[cut:]
    random.Random(seed).shuffle(train)
    return train, val


def unlabeled_shards(items, shard_dir: Path) -> str:
    """Write ``items`` once as training shards (labels ride along, unused by SSL); brace pattern."""
    if not (shard_dir / "done").exists():
        write_labeled_shards(items, shard_dir, per_shard=256)
        (shard_dir / "done").write_text("ok")
    n_shards = len(list(shard_dir.glob("shard-*.tar")))
    return f"{shard_dir}/shard-{{000000..{n_shards - 1:06d}}}.tar"


def knn(backbone, train, val, ks=(10, 20)):
    cfg = EvalTransformConfig(resize_size=96, crop_size=84)
    tr = extract_features(backbone, train, cfg, batch_size=128)
    va = extract_features(backbone, val, cfg, batch_size=128)
    return knn_accuracy(tr.features, tr.labels, va.features, va.labels, ks=ks)


def run_learning(root: Path, steps: int, out: Path, overrides=()) -> dict:
    """Train ``steps`` steps of the tiny config on ``root`` and return k-NN before/after (+ timings)."""
    train, val = split(root)
    pattern = unlabeled_shards(train, out / "shards")
    # The schedule spans the whole budget: 10 "epochs" of steps/10 iterations.
    epoch_len = max(1, steps // 10)
    cfg = load_train_config(REPO / "configs" / "train" / "tiny.yaml", [
        f"train.output_dir={out / 'run'}", "optim.epochs=10", f"optim.epoch_length={epoch_len}",
        f"optim.max_steps={steps}", "train.progress=false", "train.tensorboard=false",
        f'data.sources=[{{pattern: "{pattern}"}}]',
        f"checkpoint.every_n_steps={steps}", *overrides,
    ])
    torch.manual_seed(cfg.train.seed)
    random_init = build_backbone(cfg.model, global_crop_size(cfg), 0.0)
    t0 = time.time()
    base = knn(random_init, train, val)
    t_eval = time.time() - t0
    t0 = time.time()
    run_training(cfg)
    t_train = time.time() - t0
    trained = build_backbone(cfg.model, global_crop_size(cfg), 0.0)
    trained.load_state_dict(load_teacher_backbone_state(out / "run"))
    after = knn(trained, train, val)
    return {"steps": steps, "batch_size": cfg.data.batch_size, "train_images": len(train), "val_images": len(val),
            "train_seconds": round(t_train, 1), "eval_seconds": round(t_eval, 1), "random_init": base,
            "trained": after}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sign-digits"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--out", default="/tmp/dinov2_learning")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = Path(args.data)
    if not root.is_dir():
        sys.exit(f"sign-digits not found at {root}")
    res = run_learning(root, args.steps, Path(args.out), args.overrides)
    base, after, steps, t_train = res["random_init"], res["trained"], res["steps"], res["train_seconds"]
    print(json.dumps(res, indent=2))
    print("\n| model (tiny ViT, dim 192, depth 6, patch 14) | k-NN top-1 k=10 | k-NN top-1 k=20 |")
    print("|---|---|---|")
    print(f"| random init | {base['knn_top1_k10']:.3f} | {base['knn_top1_k20']:.3f} |")
    print(f"| SSL {steps} steps × {res['batch_size']} images ({t_train / 60:.1f} CPU min) | "
          f"{after['knn_top1_k10']:.3f} | {after['knn_top1_k20']:.3f} |")


if __name__ == "__main__":
    main()
