"""The tiny config learns for real: a short SSL run on sign-digits photos (labels unused) must beat
the same architecture at random init on weighted k-NN by a clear margin (dinov2/eval/learning.py, as
bench/train_learning.py runs it, at three quarters of its recorded 600-step budget).

Measured on the dev VM (seed 0, 300 steps × 32 images, about 3 CPU minutes): random init 0.185,
trained teacher 0.247 (k = 10, 829 queries: one binomial standard error ≈ 0.015).  After the reference
freeze / warm-up and augmentation changes of 2026-12-01 the 300-step run gave 0.199 → 0.238, just under
the margin, so the test now trains 450 steps (bench/RESULTS.md has the 600-step runs).
"""
from __future__ import annotations

import pytest

from dinov2.eval.learning import run_learning


@pytest.mark.slow
def test_short_ssl_run_beats_random_init_on_knn(tmp_path, sign_digits):
    res = run_learning(sign_digits, 450, tmp_path, ["data.num_workers=1"])
    base, after = res["random_init"]["knn_top1_k10"], res["trained"]["knn_top1_k10"]
    assert after > base + 0.04, f"k-NN top-1 (k=10): trained {after:.3f} vs random init {base:.3f}"
    assert res["trained"]["knn_top1_k20"] > res["random_init"]["knn_top1_k20"] + 0.04, res
