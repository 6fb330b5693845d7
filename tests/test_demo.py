"""The main job end to end (issue 6), at a small size: crawl → bootstrap → curate → train → eval → report."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_small_end_to_end(tmp_path, sign_digits):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "demo", "--size", "small", "--out", str(out), "--labeled", str(sign_digits)],
        cwd=REPO, capture_output=True, text=True, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The last lines say where the report is and give the headline numbers.
    tail = proc.stdout.strip().splitlines()[-3:]
    assert any("report" in line.lower() and "index.html" in line for line in tail), tail
    assert any("k-NN" in line for line in tail), tail

    report = out / "report"
    page = (report / "index.html").read_text()
    for png in ("funnel.png", "duplicates.png", "eval.png", "pca.png", "attention.png", "curves_train.png"):
        assert (report / "img" / png).stat().st_size > 2000, png
        assert f"img/{png}" in page
    numbers = json.loads((report / "numbers.json").read_text())
    funnel = numbers["funnel"]
    counts = list(funnel.values())
    assert counts[0] > 0 and all(a >= b for a, b in zip(counts, counts[1:])), funnel  # a funnel only narrows
    assert funnel["written"] > 0
    q = numbers["quality"]
    for key in ("dedup_precision", "dedup_recall", "decontam_precision", "decontam_recall"):
        assert 0.0 <= q[key] <= 1.0
    assert q["dedup_recall"] >= 0.3  # at least the exact copies are caught
    ev = numbers["eval"]
    for model in ("trained", "random init"):
        assert 0.0 <= ev[model]["knn_top1_k20"] <= 1.0
    assert ev["trained"]["n_val"] > 100  # sign-digits split in halves
    # The audit ran and passed inside `curate run`.
    assert (out / "curated" / "final" / "audit.txt").exists()


def test_random_init_baseline_uses_the_runs_position_init():
    # A backbone loaded from a checkpoint starts with the reference init; the demo's baseline must be
    # re-initialised the way the run started (tiny.yaml: sin-cos positions), not the way load_pretrained does.
    import torch

    from demo.run import _fresh_like
    from dinov2.models.vit import sincos_pos_embed, vit_tiny

    loaded = vit_tiny(img_size=84, depth=1)
    fresh = _fresh_like(loaded, "sincos")
    assert torch.equal(fresh.pos_embed, sincos_pos_embed(6, 192))
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, loaded.blocks[0].attn.qkv.weight)
    assert loaded.pos_embed.abs().max() < 0.1  # the original is untouched
    assert _fresh_like(loaded, "trunc_normal").pos_embed.abs().max() < 0.1
