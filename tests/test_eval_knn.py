"""k-NN / linear evaluation on frozen features; labeled sets from folders and tar shards; CLI."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from dinov2.eval.features import (
    EvalTransform,
    EvalTransformConfig,
    extract_features,
    list_labeled,
    write_labeled_shards,
)
from dinov2.eval.knn import knn_accuracy, knn_classify
from dinov2.eval.linear import LinearProbeConfig, linear_probe


def test_weighted_knn_matches_plain_formula():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(30, 8, generator=g), torch.randn(7, 8, generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    scores = knn_classify(train, labels, test, ks=(5, 100), temperature=0.07, num_classes=4)
    assert set(scores) == {5, 30}  # k capped at the train size
    tn = train / train.norm(dim=1, keepdim=True)
    for i in range(7):
        q = test[i] / test[i].norm()
        sims = [(float(q @ tn[j]), int(labels[j])) for j in range(30)]
        sims.sort(key=lambda t: -t[0])
        expected = torch.zeros(4)
        for s, c in sims[:5]:
            expected[c] += torch.exp(torch.tensor(s / 0.07))
        torch.testing.assert_close(scores[5][i], expected, rtol=1e-4, atol=1e-6)


def test_knn_and_linear_separate_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 16, generator=g) * 3
    ytr, yte = torch.arange(200) % 5, torch.arange(50) % 5
    xtr = centers[ytr] + torch.randn(200, 16, generator=g)
    xte = centers[yte] + torch.randn(50, 16, generator=g)
    acc = knn_accuracy(xtr, ytr, xte, yte, ks=(10, 20, 100, 200))
    assert acc["knn_top1_k20"] > 0.9 and "knn_top5_k20" in acc and "knn_top1_k200" in acc
    shuffled = knn_accuracy(xtr, ytr[torch.randperm(200, generator=g)], xte, yte, ks=(20,))
    assert shuffled["knn_top1_k20"] < 0.5
    lin = linear_probe(xtr, ytr, xte, yte, LinearProbeConfig(lrs=[0.01, 0.1], epochs=30))
    assert lin["linear_top1"] > 0.9 and lin["linear_best_lr"] in (0.01, 0.1)


def _make_folder(root: Path) -> Path:
    from skimage import data

    for label, img in (("a_astronaut", data.astronaut()), ("b_cat", data.chelsea()), ("c_coffee", data.coffee())):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(img[10 * i : 10 * i + 150, 12 * i : 12 * i + 160]).save(root / label / f"{i}.jpg")
    (root / "b_cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return root


def test_folder_and_shards_give_the_same_features(tmp_path):
    folder = _make_folder(tmp_path / "folder")
    ls = list_labeled(folder)
    assert ls.classes == ["a_astronaut", "b_cat", "c_coffee"] and len(ls.items) == 13
    shards = write_labeled_shards(ls.items, tmp_path / "shards", per_shard=5)
    assert len(shards) == 3
    # a json label sidecar and a dotted key are read too
    with tarfile.open(tmp_path / "shards" / "extra.tar", "w") as tf:
        buf = io.BytesIO()
        Image.open(ls.items[0].path).save(buf, "PNG")
        for name, payload in (("x.y.z.png", buf.getvalue()), ("x.y.z.json", b'{"label": 2}')):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    ss = list_labeled(tmp_path / "shards")
    assert len(ss.items) == 14 and sorted(i.label for i in ss.items).count(2) == 5

    torch.manual_seed(0)
    from dinov2.models.vit import DinoVisionTransformer

    model = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=1, num_heads=2)
    cfg = EvalTransformConfig(resize_size=64, crop_size=56)
    ff = extract_features(model, ls.items, cfg, batch_size=4)
    assert sum(ff.bad.values()) == 1  # the broken file is skipped and counted
    assert ff.features.shape == (12, 32)
    only_written = list_labeled(str(tmp_path / "shards" / "shard-*.tar"))  # glob: the shards written above
    fs = extract_features(model, only_written.items, cfg, batch_size=4)
    # write_labeled_shards keeps item order and bytes: the same images give the same features.
    torch.testing.assert_close(fs.features, ff.features)
    assert torch.equal(fs.labels, ff.labels) and torch.equal(fs.indices, ff.indices)


def test_eval_transform_sizes():
    t = EvalTransform(EvalTransformConfig(resize_size=256, crop_size=224))
    x = t(Image.new("RGB", (640, 480), (255, 0, 0)))
    assert x.shape == (3, 224, 224)
    assert x[0].mean() == pytest.approx((1 - 0.485) / 0.229, rel=1e-3)
    with pytest.raises(ValueError):
        EvalTransform(EvalTransformConfig(resize_size=100, crop_size=224))


def test_cli_eval_knn_and_linear(tmp_path, capsys):
    from dinov2.cli import main
    from dinov2.models.checkpoint import save_official
    from dinov2.models.vit import DinoVisionTransformer

    folder = _make_folder(tmp_path / "folder")
    torch.manual_seed(0)
    weights = tmp_path / "w.pth"
    save_official(DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=1, num_heads=1), weights)
    common = ["--weights", str(weights), "--train-dir", str(folder), "--val-dir", str(folder), "--resize", "64",
              "--crop", "56", "--device", "cpu"]
    assert main(["eval", "knn", *common, "--ks", "1", "5", "--out", str(tmp_path / "knn.json")]) == 0
    res = json.loads((tmp_path / "knn.json").read_text())
    assert set(res) >= {"knn_top1_k1", "knn_top1_k5", "n_train", "n_val"} and res["n_train"] == 12
    assert main(["eval", "linear", *common, "--lrs", "0.1", "--epochs", "5"]) == 0
    assert '"linear_top1"' in capsys.readouterr().out
    assert main(["eval", "knn", "--weights", str(tmp_path / "missing.pth"), "--train-dir", str(folder),
                 "--val-dir", str(folder)]) == 2
