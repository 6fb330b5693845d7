"""Training loop behaviour on CPU: metrics, checkpoints (atomic, keep-last-N), frozen last layer,
NaN stop, eval during training, export, config validation."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train_distributed import CONFIG, GSIZE, run, tiny_overrides

from dinov2.train.checkpoint import list_checkpoints, load_teacher_backbone_state, read_checkpoint_tensors
from dinov2.train.config import load_train_config
from dinov2.train.guard import NonFiniteLossError
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import ConfigError


def _labeled_folder(root: Path) -> Path:
    """Two classes of real photo crops (astronaut vs cat), 6 images each."""
    from skimage import data

    for label, img in (("astronaut", data.astronaut()), ("cat", data.chelsea())):
        (root / label).mkdir(parents=True)
        for i in range(6):
            y, x = 20 * i, 15 * i
            Image.fromarray(img[y : y + 200, x : x + 200]).save(root / label / f"{i}.jpg", quality=90)
    return root


def test_metrics_checkpoints_frozen_last_layer_and_eval(tmp_path):
    labeled = _labeled_folder(tmp_path / "labeled")
    out = tmp_path / "run"
    res = run(out, 3, ["checkpoint.every_n_steps=1", "checkpoint.keep_last=2", "eval.every_n_steps=3",
                       f"eval.train_dir={labeled}", f"eval.val_dir={labeled}", "eval.resize_size=48",
                       f"eval.crop_size={GSIZE}", "eval.ks=[1,3,100]"])
    assert res.final_step == 3
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "total_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for key in ("dino_loss", "ibot_loss", "koleo_loss", "total_loss", "lr", "wd", "momentum", "teacher_temp",
                "images_per_s", "peak_memory_mb", "teacher_entropy", "teacher_feature_std", "student_feature_std",
                "grad_norm_backbone", "last_layer_lr"):
        assert all(np.isfinite(r[key]) for r in steps), key
    r1 = steps[0]
    assert r1["total_loss"] == pytest.approx(r1["dino_loss"] + r1["ibot_loss"] + 0.1 * r1["koleo_loss"], rel=1e-5)
    assert 0 < r1["teacher_entropy"] <= r1["max_entropy"] + 1e-6
    # Eval row: weighted k-NN with k capped at the train size (12 images → k=100 becomes 12).
    ev = [r for r in rows if "eval_knn_top1_k1" in r]
    assert len(ev) == 1 and ev[0]["step"] == 3
    assert "eval_knn_top1_k12" in ev[0] and ev[0]["eval_n_train"] == 12
    assert 0.0 <= ev[0]["eval_knn_top1_k1"] <= 1.0

    # keep-last-2, no temporary folders left
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["step_000002", "step_000003"]
    assert not list((out / "ckpt").glob("*.tmp"))
    meta = json.loads((out / "ckpt" / "step_000003" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["data_sample"] == 3 * 8 and meta["world_size"] == 1

    # The last layer is frozen for freeze_last_layer_epochs × epoch_length = 2 iterations.
    cfg = load_train_config(CONFIG, tiny_overrides(out, 3))
    torch.manual_seed(cfg.train.seed)
    init = SSLMetaArch(cfg.model, cfg.head, cfg.loss, GSIZE).student.state_dict()
    key = "dino_head.last_layer.weight"
    at2 = read_checkpoint_tensors(out / "ckpt" / "step_000002", "student.")
    at3 = read_checkpoint_tensors(out / "ckpt" / "step_000003", "student.")
    assert torch.equal(at2[key], init[key])
    assert not torch.equal(at3[key], init[key])
    assert not torch.equal(at2["backbone.blocks.0.attn.qkv.weight"], init["backbone.blocks.0.attn.qkv.weight"])
    # The teacher moved towards the student (EMA), but is not the student.
    teacher = load_teacher_backbone_state(out)
    assert not torch.equal(teacher["blocks.0.attn.qkv.weight"], init["backbone.blocks.0.attn.qkv.weight"])
    assert not torch.equal(teacher["blocks.0.attn.qkv.weight"], at3["backbone.blocks.0.attn.qkv.weight"])

    # Export: official flat layout, loadable by load_pretrained, equal to the teacher.  The run has
    # 2 heads at width 64 (default 1): a .pth cannot record that, so it is refused; safetensors records it.
    from safetensors.torch import load_file

    from dinov2.cli import main
    from dinov2.models.checkpoint import load_pretrained

    assert main(["export", str(out), str(tmp_path / "teacher.pth")]) == 2
    assert main(["export", str(out), str(tmp_path / "teacher.safetensors")]) == 0
    sd = load_file(str(tmp_path / "teacher.safetensors"))
    assert "blocks.0.attn.qkv.weight" in sd and "pos_embed" in sd and not any(k.startswith("backbone.") for k in sd)
    model = load_pretrained(tmp_path / "teacher.safetensors")
    assert model.num_heads == cfg.model.num_heads == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, teacher[k])


def test_non_finite_loss_stops_without_saving(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step 3.*Last good checkpoint: "
                                                 r".*step_000001"):
        run(out, 5, ["checkpoint.every_n_steps=1", "checkpoint.keep_last=0"], nan_at_step=3)
    # Step 2's checkpoint is finite, but the step after it was not: it cannot be told apart from an
    # exploded state, so it is not a good checkpoint; it is moved aside and step 1 is named instead.
    assert [p.name for p in list_checkpoints(out)] == ["step_000001"]
    assert (out / "ckpt" / "step_000002.unverified").is_dir()
    assert not list((out / "ckpt").glob("*.tmp"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    # The last good checkpoint is intact: training resumes from it once the data is fine.
    res = run(out, 4, ["checkpoint.every_n_steps=1", "checkpoint.keep_last=0"])
    assert res.start_step == 1 and res.final_step == 4
    state = read_checkpoint_tensors(out, "teacher.")
    assert all(torch.isfinite(v).all() for v in state.values())


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    base = [f"train.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="bogus"):
        load_train_config(CONFIG, base + ["model.bogus=1"])
    with pytest.raises(ConfigError, match="centering"):
        load_train_config(CONFIG, base + ["loss.centering=mean"])
    with pytest.raises(ConfigError, match="pos_embed_init"):
        load_train_config(CONFIG, base + ["model.pos_embed_init=random"])
    with pytest.raises(ConfigError, match="output_dir"):
        load_train_config(CONFIG, [])
    with pytest.raises(ConfigError, match="patch_size"):
        load_train_config(CONFIG, base + ["model.patch_size=16"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(bad_yaml, base)


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vitl14", "vitg14", "dino_vits16", "dino_vitb8", "tiny"])
def test_shipped_configs_load(name, tmp_path):
    cfg = load_train_config(CONFIG.parent / f"{name}.yaml", [f"train.output_dir={tmp_path}"])
    assert cfg.model.patch_size == cfg.data.patch_size
    if name.startswith("dino_"):  # original DINO recipe: DINO loss only, softmax centering, no LayerScale
        assert cfg.loss.ibot_weight == 0 and cfg.loss.koleo_weight == 0
        assert cfg.loss.centering == "softmax" and cfg.model.layerscale is None
        assert cfg.data.crops.local_crops_number == 10 and cfg.data.crops.local_crops_size == 96
    if name in ("vitl14", "vitg14"):
        assert cfg.loss.centering == "sinkhorn_knopp" and cfg.optim.momentum_teacher == 0.994
        assert cfg.head.ibot_separate_head and cfg.head.dino_out_dim == 131072


def test_real_loader_from_shards(tmp_path):
    """One step through dinov2.data.loader on real JPEG tar shards (no injected batches)."""
    from skimage import data

    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"] * 3):
            img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((120, 100))
            p = tmp_path / f"{i:04d}.jpg"
            img.save(p, quality=85)
            tf.add(p, arcname=f"{i:04d}.jpg")
    cfg = load_train_config(CONFIG, tiny_overrides(tmp_path / "run", 2) + [
        f"data.sources=[{{pattern: \"{shard}\"}}]", "data.num_workers=0", "data.batch_size=4", "data.shuffle_buffer=4"])
    from dinov2.train.train import run_training

    res = run_training(cfg)
    assert res.final_step == 2
    assert all(np.isfinite(r["total_loss"]) for r in res.metrics)


def test_activation_checkpointing_keeps_loss_and_gradients():
    """AC changes memory, not math: same loss and gradients, same parameter names."""
    from test_train_distributed import photo_batch_source

    from dinov2.train.ssl_meta_arch import parallelize

    cfg = load_train_config(CONFIG, tiny_overrides("/tmp/unused", 1) + ["model.drop_path_rate=0.2"])
    batch = next(iter(photo_batch_source()(0, 1, 0)))
    results = []
    for ac in (False, True):
        torch.manual_seed(0)
        arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, GSIZE)
        parallelize(arch, torch.device("cpu"), "fp32", use_fsdp=False, activation_checkpointing=ac)
        torch.manual_seed(1)  # same drop-path draws
        out = arch.forward_loss(batch, 0.04)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in arch.student.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)
