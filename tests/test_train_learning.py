"""The tiny config learns for real: a short SSL run on sign-digits photos (labels unused) must beat
the same architecture at random init on weighted k-NN by a clear margin (bench/train_learning.py
at a smaller budget)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sign-digits"


@pytest.mark.slow
# Known failure (issue 3): every short-run setting tried so far ends in the uniform-teacher regime and
# does not beat random init; strict, so the test turns red (XPASS) as soon as a fix makes it learn.
@pytest.mark.xfail(strict=True, raises=AssertionError,  # a crash is a real failure, not the known one
                   reason="issue 3: short CPU SSL runs do not beat random init yet")
def test_short_ssl_run_beats_random_init_on_knn(tmp_path):
    if not DATA.is_dir():
        pytest.skip(f"sign-digits photos not found at {DATA} (needed for the learning check)")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from train_learning import run_learning
    finally:
        sys.path.remove(str(REPO / "bench"))
    # Half of the images, 30 steps of 32 images: about a minute on 2 CPU cores.
    res = run_learning(DATA, 30, tmp_path, ["data.num_workers=1"], train_fraction=0.5)
    base, after = res["random_init"]["knn_top1_k10"], res["trained"]["knn_top1_k10"]
    assert after > base + 0.05, f"k-NN top-1 (k=10): trained {after:.3f} vs random init {base:.3f}"
