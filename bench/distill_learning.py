"""Does distillation transfer a teacher's features to a smaller student faster than SSL from scratch?

The recipe is dinov2/eval/learning.py::run_distillation.  Sign-digits photos, the same stratified split as bench/train_learning.py (60 % of each class: training
images and k-NN memory bank; 40 %: k-NN queries).

1. Teacher: the tiny config's ViT (dim 192, depth 6, patch 14) trained *with labels* (cross-entropy on
   the CLS token, random-resized crops) on the 60 % part, then written as a backbone-only file in the
   official layout.  No pretrained ViT can be downloaded here and no short SSL run gives a teacher
   worth distilling on this CPU (see bench/RESULTS.md), so a supervised teacher stands in for "a large
   pretrained model": the test is about what distillation transfers, not how the teacher was made.
2. Student (configs/train/tiny_distill.yaml: dim 128, depth 4), the same number of steps twice, on
   unlabeled shards of the same 60 %:
   * distilled: frozen teacher, ``distill.teacher_heads=random_frozen`` (backbone-only file);
   * scratch: plain SSL, same config without a teacher.
3. Weighted k-NN (k = 10, 20) on the CLS of: the teacher, both students' EMA (what gets exported), and
   the student architecture at random init.

    .venv/bin/python bench/distill_learning.py --student-steps 300 --out /tmp/distill
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinov2.eval.learning import STUDENT_RECIPE, run_distillation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sign-digits"))
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--student-steps", type=int, default=300)
    ap.add_argument("--out", default="/tmp/dinov2_distill")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides of both student runs, after STUDENT_RECIPE")
    args = ap.parse_args()
    root = Path(args.data)
    if not root.is_dir():
        sys.exit(f"sign-digits not found at {root}")
    res = run_distillation(root, Path(args.out), args.teacher_epochs, args.student_steps,
                           STUDENT_RECIPE + tuple(args.overrides))
    print(json.dumps(res, indent=2))
    print("\n| model | k-NN top-1 k=10 | k=20 | train time |")
    print("|---|---|---|---|")
    rows = [("teacher: tiny ViT (dim 192, depth 6), supervised", "teacher", "teacher_seconds"),
            ("student (dim 128, depth 4), random init", "student_random_init", None),
            (f"student, SSL from scratch, {args.student_steps} steps", "student_scratch", "scratch_seconds"),
            (f"student, distilled from the teacher, {args.student_steps} steps", "student_distilled",
             "distilled_seconds")]
    for name, key, tkey in rows:
        t = f"{res[tkey]:.0f} s" if tkey else "—"
        print(f"| {name} | {res[key]['knn_top1_k10']:.3f} | {res[key]['knn_top1_k20']:.3f} | {t} |")


if __name__ == "__main__":
    main()
