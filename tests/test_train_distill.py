"""Distillation: a frozen (larger) teacher trains a smaller student with the DINO/iBOT/KoLeo
objective; the student's EMA is what checkpoints hold and ``dinov2 export`` writes.

The slow test checks the point of distillation on real photos (sign-language digits, 10 classes):
after the same small number of steps, a student distilled from an SSL-trained teacher gets closer
to the teacher's k-NN accuracy than the same student trained by SSL from scratch."""
from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2.models.checkpoint import load_pretrained, save_official
from dinov2.models.vit import DinoVisionTransformer
from dinov2.train.checkpoint import read_checkpoint_tensors
from dinov2.train.config import load_train_config
from dinov2.train.distill import attach_frozen_teacher, load_frozen_teacher
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import build_optimizer, run_training
from dinov2.utils.config import ConfigError
from test_train_distributed import CONFIG, GSIZE, photo_batch_source, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
SIGN_DIGITS = REPO.parent / "shared" / "data" / "sign-digits"


def _teacher_file(path: Path, patch: int = 14, dim: int = 96) -> Path:
    torch.manual_seed(123)
    save_official(DinoVisionTransformer(img_size=3 * patch, patch_size=patch, embed_dim=dim, depth=2, num_heads=3), path)
    return path


def test_frozen_teacher_student_ema_checkpoint_and_export(tmp_path):
    teacher_pth = _teacher_file(tmp_path / "teacher.pth")  # 96-dim teacher, 64-dim student
    ov = tiny_overrides(tmp_path / "run", 2) + [f"distill.teacher_checkpoint={teacher_pth}"]
    cfg = load_train_config(CONFIG, ov)

    # One step by hand: the frozen teacher gets no gradient and never moves; the student EMA does.
    torch.manual_seed(0)
    arch = SSLMetaArch(cfg.model, cfg.head, cfg.loss, GSIZE)
    attach_frozen_teacher(arch, cfg)
    assert arch.frozen_teacher["backbone"].embed_dim == 96 and arch.teacher["backbone"].embed_dim == 64
    frozen0 = {k: v.clone() for k, v in arch.frozen_teacher.state_dict().items()}
    ema0 = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    opt = build_optimizer(arch, cfg)
    assert not any(p.requires_grad for p in arch.frozen_teacher.parameters())
    opt_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not opt_ids & {id(p) for p in arch.frozen_teacher.parameters()}
    for p in opt.param_groups:
        p["lr"] = 1e-3
    batch = next(iter(photo_batch_source()(0, 1, 0)))
    out = arch.forward_loss(batch, 0.04)
    out.loss.backward()
    opt.step()
    arch.update_teacher(0.9)
    assert all(torch.equal(v, frozen0[k]) for k, v in arch.frozen_teacher.state_dict().items())
    assert not torch.equal(arch.teacher.state_dict()["backbone.blocks.0.attn.qkv.weight"],
                           ema0["backbone.blocks.0.attn.qkv.weight"])
    assert np.isfinite(float(out.loss.detach())) and set(out.terms) >= {"dino_loss", "ibot_loss", "koleo_loss"}

    # A real run: checkpoints hold the student and its EMA (64-dim), never the frozen teacher.
    res = run_training(cfg, batch_source=photo_batch_source())
    assert res.final_step == 2
    t = read_checkpoint_tensors(res.last_checkpoint, "teacher.backbone.")
    s = read_checkpoint_tensors(res.last_checkpoint, "student.backbone.")
    assert t["cls_token"].shape[-1] == 64 and t.keys() == s.keys()
    assert not torch.equal(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])
    from dinov2.cli import main

    assert main(["export", str(res.run_dir), str(tmp_path / "student_ema.pth")]) == 0
    exported = load_pretrained(str(tmp_path / "student_ema.pth"))
    assert exported.embed_dim == 64
    assert torch.equal(exported.state_dict()["blocks.0.attn.qkv.weight"], t["blocks.0.attn.qkv.weight"])


def test_teacher_heads_modes_and_errors(tmp_path):
    teacher_pth = _teacher_file(tmp_path / "teacher.pth")
    base = tiny_overrides(tmp_path / "run", 2)
    cfg = load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={teacher_pth}"])
    # Backbone-only file → seeded frozen random heads, identical on every (re)start.
    a = load_frozen_teacher(cfg, use_ibot=True, separate_ibot_head=False)
    b = load_frozen_teacher(cfg, use_ibot=True, separate_ibot_head=True)
    assert torch.equal(a["dino_head"].mlp[0].weight, b["dino_head"].mlp[0].weight)
    assert b["ibot_head"].out_dim == cfg.head.ibot_out_dim and "ibot_head" not in a

    # Heads from one of our training runs (the reference setting): loaded, not random.
    run = tmp_path / "teacher_run"
    res = run_training(load_train_config(CONFIG, tiny_overrides(run, 1)), batch_source=photo_batch_source())
    heads = read_checkpoint_tensors(res.last_checkpoint, "teacher.dino_head.")
    for mode in ("auto", "checkpoint"):
        cfg2 = load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={run}", f"distill.teacher_heads={mode}"])
        t = load_frozen_teacher(cfg2, use_ibot=True, separate_ibot_head=False)
        assert torch.equal(t["dino_head"].mlp[0].weight, heads["mlp.0.weight"])
    # Prototype count mismatch with heads=checkpoint: a clear error.
    cfg3 = load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={run}", "distill.teacher_heads=checkpoint",
                                             "head.dino_out_dim=128"])
    with pytest.raises(ValueError, match="prototypes"):
        load_frozen_teacher(cfg3, use_ibot=True, separate_ibot_head=False)

    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={tmp_path / 'nope.pth'}"])
    with pytest.raises(ConfigError, match="needs a run or checkpoint folder"):
        load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={teacher_pth}", "distill.teacher_heads=checkpoint"])
    with pytest.raises(ConfigError, match="teacher_heads"):
        load_train_config(CONFIG, base + ["distill.teacher_heads=trained"])
    p16 = _teacher_file(tmp_path / "teacher16.pth", patch=16)
    with pytest.raises(ValueError, match="patch size"):
        load_frozen_teacher(load_train_config(CONFIG, base + [f"distill.teacher_checkpoint={p16}"]), True, False)


# ----------------------------------------------------------------------------- k-NN on real photos
def _sign_digit_data(root: Path, n_train: int, n_val: int, n_ssl: int) -> tuple[Path, Path, str]:
    """Per class: n_train (k-NN memory) and n_val (queries) as symlinked folders; n_ssl unlabeled
    photos per class (disjoint from val) as tar shards for the training loader."""
    train_dir, val_dir, shards = root / "knn_train", root / "knn_val", root / "shards"
    shards.mkdir(parents=True)
    ssl = []
    for c in range(10):
        files = sorted((SIGN_DIGITS / str(c)).glob("*.JPG"))
        for d, part in ((train_dir, files[:n_train]), (val_dir, files[n_train:n_train + n_val])):
            (d / str(c)).mkdir(parents=True)
            for f in part:
                (d / str(c) / f.name).symlink_to(f)
        ssl += files[n_train + n_val:n_train + n_val + n_ssl] if n_ssl > 0 else []
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ssl))
    for s in range(2):
        with tarfile.open(shards / f"ssl-{s:06d}.tar", "w") as tf:
            for i in order[s::2]:
                tf.add(ssl[i], arcname=f"img{i:05d}.jpg")
    return train_dir, val_dir, str(shards / "ssl-{000000..000001}.tar")


def _knn(weights: Path, train_dir: Path, val_dir: Path) -> float:
    from dinov2.cli import load_backbone_weights
    from dinov2.eval.run import evaluate_backbone
    from argparse import Namespace

    model = load_backbone_weights(weights)
    ev = Namespace(train_dir=str(train_dir), val_dir=str(val_dir), resize_size=48, crop_size=42, batch_size=128,
                   num_workers=0, ks=[10], temperature=0.07, linear=False)
    return float(evaluate_backbone(model, ev, "cpu")["knn_top1_k10"])


def _ssl_overrides(out: Path, steps: int, pattern: str, dim: int, depth: int, heads: int, extra=()) -> list[str]:
    return tiny_overrides(out, steps) + [
        f'data.sources=[{{pattern: "{pattern}"}}]', "data.batch_size=16", "data.num_workers=0",
        "data.streams_per_rank=2", "data.shuffle_buffer=64", "data.crops.global_crops_scale=[0.5,1.0]",
        "data.crops.local_crops_scale=[0.2,0.5]", f"model.embed_dim={dim}", f"model.depth={depth}",
        f"model.num_heads={heads}", "optim.epoch_length=10", "optim.epochs=20", "optim.warmup_epochs=1",
        "optim.freeze_last_layer_epochs=0.5", "optim.base_lr=0.002", "checkpoint.every_n_steps=1000",
        "checkpoint.keep_last=1", *extra,
    ]


def _supervised_teacher(files_by_class: list[list[Path]], out: Path, steps: int = 150) -> Path:
    """A 96-dim ViT fitted with labels on photos disjoint from the k-NN sets, saved as a
    backbone-only official-layout file (the teacher then gets frozen random heads, like an official
    checkpoint).  A brief SSL run cannot give an informative teacher in a CPU test's budget (its
    targets stay near-uniform for the first hundreds of steps), a supervised fit can."""
    from PIL import Image

    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    xs, ys = [], []
    for c, files in enumerate(files_by_class):
        for f in files:
            img = Image.open(f).convert("RGB").resize((48, 48), Image.BICUBIC)
            xs.append((torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255 - mean) / std)
            ys.append(c)
    x, y = torch.stack(xs), torch.tensor(ys)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    # No LayerScale: with gamma=1e-5 the blocks start as identities and a short fit barely moves the CLS.
    model = DinoVisionTransformer(img_size=42, patch_size=14, embed_dim=96, depth=3, num_heads=3, init_values=None)
    clf = torch.nn.Linear(96, len(files_by_class))
    opt = torch.optim.AdamW(list(model.parameters()) + list(clf.parameters()), lr=1e-3, weight_decay=0.05)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        oy, ox = (int(v) for v in torch.randint(0, 7, (2,), generator=g))
        batch = x[idx, :, oy:oy + 42, ox:ox + 42]
        loss = torch.nn.functional.cross_entropy(clf(model(batch)), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_official(model.eval(), out)


@pytest.mark.slow
@pytest.mark.skipif(not SIGN_DIGITS.is_dir(), reason=f"real photos not found at {SIGN_DIGITS} (sign-digits data set)")
def test_distilled_student_approaches_teacher_faster_than_scratch(tmp_path):
    student_steps = int(os.environ.get("DISTILL_TEST_STUDENT_STEPS", "25"))
    n_train, n_val, n_ssl = 20, 10, 60
    train_dir, val_dir, pattern = _sign_digit_data(tmp_path / "data", n_train, n_val, n_ssl)
    # Teacher photos: per class, the ones after the k-NN and SSL photos (disjoint from both).
    rest = [sorted((SIGN_DIGITS / str(c)).glob("*.JPG"))[n_train + n_val + n_ssl:] for c in range(10)]
    teacher = _supervised_teacher(rest, tmp_path / "teacher.pth")

    scratch = tmp_path / "scratch"
    run_training(load_train_config(CONFIG, _ssl_overrides(scratch, student_steps, pattern, 64, 2, 2)))
    distilled = tmp_path / "distilled"
    run_training(load_train_config(CONFIG, _ssl_overrides(
        distilled, student_steps, pattern, 64, 2, 2, [f"distill.teacher_checkpoint={teacher}"])))

    acc = {name: _knn(run, train_dir, val_dir) for name, run in
           (("teacher", teacher), ("scratch", scratch), ("distilled", distilled))}
    print("k-NN top-1 (k=10) on sign-digits:", json.dumps(acc))
    assert acc["teacher"] > acc["scratch"]
    # Closer to the teacher than the same student trained from scratch on the same budget.
    assert acc["teacher"] - acc["distilled"] < acc["teacher"] - acc["scratch"]
