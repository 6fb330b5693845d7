"""Does the tiny config learn for real?  Self-supervised training on sign-digits photos (no labels),
then weighted k-NN on frozen teacher CLS features vs the same architecture at random init.

The recipe is dinov2/eval/learning.py::run_learning.  Split (stratified, seeded): 60 % of each class → SSL training images (labels unused) and the k-NN
memory bank; 40 % → k-NN queries.  Both models are evaluated with the same transform (resize 96 →
center crop 84) and k ∈ {10, 20}.

    .venv/bin/python bench/train_learning.py --steps 600 --out /tmp/learn [KEY=VALUE …]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinov2.eval.learning import run_learning


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
