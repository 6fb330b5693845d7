"""``dinov2 features``: CLS + patch features of an image folder or shards, .npy and Parquet, with the
eval preprocessing; undecodable images are marked, not fatal."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.cli import main
from dinov2.eval.features import EvalTransformConfig, extract_features, list_images, write_labeled_shards
from dinov2.models import DinoVisionTransformer, save_official


def _photos(root: Path) -> Path:
    """Six real photo crops in nested folders, plus one file that is not an image."""
    from skimage import data

    for i, img in enumerate([data.astronaut(), data.chelsea(), data.coffee()]):
        for j in range(2):
            path = root / f"set{j}" / f"{i}_{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[30 * j : 30 * j + 250, 20 * j : 20 * j + 300]).save(path, quality=90)
    (root / "set1" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture()
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=2, num_register_tokens=2)
    path = tmp_path / "w.pth"
    save_official(model, path)
    return path


def test_features_npy_match_eval_preprocessing(tmp_path, weights, capsys):
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    rc = main(["features", "--weights", str(weights), "--input", str(photos), "--out", str(out),
               "--resize", "64", "--crop", "56", "--batch-size", "4"])
    assert rc == 0, capsys.readouterr().err
    index = json.loads((out / "index.json").read_text())
    names = [Path(r["path"]).name for r in index["images"]]
    assert names == ["0_0.jpg", "1_0.jpg", "2_0.jpg", "0_1.jpg", "1_1.jpg", "2_1.jpg", "broken.png"]
    assert [r["ok"] for r in index["images"]] == [True] * 6 + [False]
    assert index["grid"] == [4, 4] and index["dim"] == 64 and sum(index["bad"].values()) == 1
    cls, patch, reg = (np.load(out / f"{n}.npy") for n in ("cls", "patch", "registers"))
    assert cls.shape == (7, 64) and patch.shape == (7, 4, 4, 64) and reg.shape == (7, 2, 64)
    assert np.isnan(cls[6]).all() and np.isfinite(cls[:6]).all() and np.isfinite(patch[:6]).all()

    # Same numbers as the eval feature path (same transform) and as the model's patch tokens.
    from dinov2.models import load_pretrained

    model = load_pretrained(weights)
    items = list_images(photos).items
    tcfg = EvalTransformConfig(resize_size=64, crop_size=56)
    ev = extract_features(model, items, tcfg, batch_size=3)
    assert ev.indices.tolist() == [0, 1, 2, 3, 4, 5]
    np.testing.assert_allclose(cls[:6], ev.features.numpy(), atol=1e-5)
    patches = extract_features(model, items, tcfg, batch_size=3,
                               feature_fn=lambda m, x: m.forward_features(x)["x_norm_patchtokens"])
    np.testing.assert_allclose(patch[:6].reshape(6, 16, 64), patches.features.numpy(), atol=1e-5)
    assert not list(out.glob(".*.tmp"))


def test_features_from_shards_to_parquet(tmp_path, weights):
    import pyarrow.parquet as pq

    photos = _photos(tmp_path / "photos")
    items = [it for it in list_images(photos).items if it.path.endswith(".jpg")]
    shards = write_labeled_shards(items, tmp_path / "shards", per_shard=4)
    assert len(shards) == 2
    npy, parquet = tmp_path / "npy", tmp_path / "pq"
    common = ["--weights", str(weights), "--resize", "64", "--crop", "56"]
    assert main(["features", *common, "--input", str(tmp_path / "shards"), "--out", str(npy), "--cls-only"]) == 0
    assert not (npy / "patch.npy").exists()
    pattern = str(tmp_path / "shards" / "shard-{000000..000001}.tar")
    assert main(["features", *common, "--input", pattern, "--out", str(parquet), "--format", "parquet"]) == 0
    table = pq.read_table(parquet / "features.parquet").to_pydict()
    assert table["member"] == [f"{i:08d}.jpg" for i in range(6)] and table["label"] == [-1] * 6
    np.testing.assert_allclose(np.array(table["cls"]), np.load(npy / "cls.npy"), atol=1e-6)
    assert len(table["patch"][0]) == 16 * 64
    # Shards and the folder give the same features (same bytes, same preprocessing).
    assert main(["features", *common, "--input", str(photos), "--out", str(tmp_path / "dir"), "--cls-only"]) == 0
    np.testing.assert_allclose(np.load(npy / "cls.npy"), np.load(tmp_path / "dir" / "cls.npy")[:6], atol=1e-6)


def test_features_bad_input_is_a_one_line_error(tmp_path, weights, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["features", "--weights", str(weights), "--input", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert main(["features", "--weights", str(weights), "--input", str(tmp_path / "photos"),
                 "--out", str(tmp_path / "o"), "--crop", "50", "--resize", "64"]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"junk")
    assert main(["features", "--weights", str(weights), "--input", str(tmp_path / "bad"),
                 "--out", str(tmp_path / "o2")]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 3 and all(ln.startswith("dinov2 features: error:") for ln in lines)
    assert not (tmp_path / "o2" / "cls.npy").exists() and not (tmp_path / "o2" / "index.json").exists()
