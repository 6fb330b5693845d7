"""ViT backbone: official layout, forward API, drop path, init, checkpoint wrappers and errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from dinov2.models import (
    CheckpointError,
    DinoVisionTransformer,
    TokenLayout,
    attention_backend,
    build_model,
    export_official,
    infer_architecture,
    load_pretrained,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinov2.models.drop_path import drop_add_residual_subset, drop_path, residual_with_drop_path


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def random_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def dino2021_state(patch: int, dim: int, depth: int) -> dict[str, torch.Tensor]:
    """A DINO (2021)-style backbone state dict: no LayerScale, no mask_token, 224 grid."""
    torch.manual_seed(patch)
    model = DinoVisionTransformer(
        img_size=224, patch_size=patch, embed_dim=dim, depth=depth, init_values=None
    )
    state = export_official(model)
    del state["mask_token"]
    return dict(state)


def official_shapes(dim, depth, hidden, swiglu, registers, patch=14, grid=37):
    """Key → shape of the released dinov2_vit*14[_reg4]_pretrain.pth files (reference-facts.md)."""
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, grid * grid + 1, dim)}
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    shapes["mask_token"] = (1, dim)
    shapes["patch_embed.proj.weight"] = (dim, 3, patch, patch)
    shapes["patch_embed.proj.bias"] = (dim,)
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({p + "norm1.weight": (dim,), p + "norm1.bias": (dim,)})
        shapes.update({p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,)})
        shapes.update(
            {p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,), p + "ls1.gamma": (dim,)}
        )
        shapes.update({p + "norm2.weight": (dim,), p + "norm2.bias": (dim,)})
        if swiglu:
            shapes.update({p + "mlp.w12.weight": (2 * hidden, dim), p + "mlp.w12.bias": (2 * hidden,)})
            shapes.update({p + "mlp.w3.weight": (dim, hidden), p + "mlp.w3.bias": (dim,)})
        else:
            shapes.update({p + "mlp.fc1.weight": (hidden, dim), p + "mlp.fc1.bias": (hidden,)})
            shapes.update({p + "mlp.fc2.weight": (dim, hidden), p + "mlp.fc2.bias": (dim,)})
        shapes[p + "ls2.gamma"] = (dim,)
    shapes.update({"norm.weight": (dim,), "norm.bias": (dim,)})
    return shapes


# ------------------------------------------------------------------ official layout
SIZES = {
    "vit_small": (vit_small, 384, 12, 6, 1536, False),
    "vit_base": (vit_base, 768, 12, 12, 3072, False),
    "vit_large": (vit_large, 1024, 24, 16, 4096, False),
    "vit_giant2": (vit_giant2, 1536, 40, 24, 4096, True),
}


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("arch", list(SIZES))
def test_official_layout_keys_shapes_and_order(arch, registers):
    builder, dim, depth, heads, hidden, swiglu = SIZES[arch]
    with torch.device("meta"):  # ViT-g has 1.1B parameters: check the layout without allocating
        model = builder(num_register_tokens=registers)
    assert model.num_heads == heads and len(model.blocks) == depth
    exported = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_shapes(dim, depth, hidden, swiglu, registers)
    assert exported == expected
    assert list(exported) == list(expected)  # same order as the released files
    # The architecture inferred from the layout alone rebuilds the same model.
    inferred = infer_architecture({k: torch.empty(s, device="meta") for k, s in expected.items()})
    assert inferred["embed_dim"] == dim and inferred["depth"] == depth and inferred["patch_size"] == 14
    assert inferred["num_register_tokens"] == registers and inferred["img_size"] == 518
    assert (
        inferred["ffn_layer"] == ("swiglufused" if swiglu else "mlp")
        and inferred["ffn_hidden_features"] == hidden
    )
    if arch == "vit_giant2":
        assert sum(p.numel() for p in model.parameters()) > 1.1e9


def test_forward_modes_and_intermediate_layers():
    torch.manual_seed(0)
    model = vit_tiny(depth=4, img_size=56, init_values=1.0).eval()
    images = random_images(2, 42, 70)
    with torch.no_grad():
        cls = model(images)
        features = model(images, is_training=True)
        listed = model([images, images[:1]])
        assert torch.equal(cls, features["x_norm_clstoken"]) and cls.shape == (2, 192)
        assert len(listed) == 2 and max_diff(listed[1], cls[:1]) < 1e-5
        last_two = model.get_intermediate_layers(images, n=2)
        by_index = model.get_intermediate_layers(images, n=[2, 3], return_class_token=True)
        grids = model.get_intermediate_layers(images, n=[3, 1], reshape=True)
        raw = model.get_intermediate_layers(images, n=1, norm=False)
    assert len(last_two) == 2 and last_two[0].shape == (2, 15, 192)
    assert torch.equal(last_two[1], features["x_norm_patchtokens"])
    assert torch.equal(by_index[1][0], last_two[1]) and torch.equal(by_index[1][1], cls)
    assert grids[0].shape == (2, 192, 3, 5)  # sorted block order like the official API
    assert torch.equal(grids[1].flatten(2).transpose(1, 2), last_two[1])
    assert torch.equal(raw[0], features["x_prenorm"][:, 1:])
    with pytest.raises(ValueError, match="outside"):
        model.get_intermediate_layers(images, n=[4])
    # Masks may be given flat [B, N] or as the [B, h, w] patch grid; masked patches change the output.
    grid_masks = torch.zeros(2, 3, 5, dtype=torch.bool)
    grid_masks[0, 1, 2:] = True
    with torch.no_grad():
        masked_grid = model.forward_features(images, grid_masks)["x_norm_patchtokens"]
        masked_flat = model.forward_features(images, grid_masks.flatten(1).int())["x_norm_patchtokens"]
    assert torch.equal(masked_grid, masked_flat)
    assert max_diff(masked_grid[0], features["x_norm_patchtokens"][0]) > 1e-3
    assert torch.equal(masked_grid[1], features["x_norm_patchtokens"][1])
    with pytest.raises(ValueError, match="does not match the patch grid"):
        model.forward_features(images, torch.zeros(2, 14, dtype=torch.bool))
    with pytest.raises(TypeError, match="pass masks as a list"):
        model.forward_features([images], grid_masks)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.zeros(1, 3, 50, 56))


# ----------------------------------------------------------------- drop path
def test_efficient_drop_path_expectation_and_skipped_work():
    torch.manual_seed(0)
    layout = TokenLayout(((8, 3), (6, 2)))
    x = torch.randn(layout.num_tokens, 4)
    seen_rows = []

    def branch(tokens, sub_layout):
        seen_rows.append((tokens.shape[0], sub_layout.groups))
        return torch.tanh(tokens) * 2.0 + 1.0

    trials = 3000
    total = torch.zeros_like(x)
    for _ in range(trials):
        total += drop_add_residual_subset(x, layout, branch, rate=0.4)
    # Only floor(B * 0.6) samples per group went through the branch: 4 of 8 and 3 of 6.
    assert {s for s in seen_rows} == {(4 * 3 + 3 * 2, ((4, 3), (3, 2)))}
    expected = x + branch(x, layout)
    standard_error = (expected - x).abs().max() * math.sqrt(1 / 0.6) / math.sqrt(trials)
    assert max_diff(total / trials, expected) < 6 * standard_error
    # Rows of dropped samples are untouched; kept rows get the residual scaled by B / kept.
    out = drop_add_residual_subset(
        x[:8], TokenLayout.single(4, 2), lambda t, lay: torch.ones_like(t), rate=0.5
    )
    per_sample = (out - x[:8]).view(4, 2, 4)[:, 0, 0]
    assert sorted(per_sample.tolist()) == [0.0, 0.0, 2.0, 2.0]
    # At least one sample is kept even at a very high rate.
    out = drop_add_residual_subset(
        x[:3], TokenLayout.single(1, 3), lambda t, lay: torch.ones_like(t), rate=0.95
    )
    assert torch.allclose(out - x[:3], torch.ones(3, 4))


def test_per_sample_drop_path_below_threshold():
    torch.manual_seed(1)
    layout = TokenLayout(((64, 2), (32, 3)))
    ones = torch.ones(layout.num_tokens, 5)
    seen = []

    def branch(tokens, lay):
        seen.append(tokens.shape[0])
        return ones

    out = residual_with_drop_path(torch.zeros_like(ones), layout, branch, rate=0.1, training=True)
    assert seen == [layout.num_tokens]  # <= 0.1: the branch runs on everything
    assert all(v == 0.0 or v == pytest.approx(1 / 0.9) for v in torch.unique(out).tolist())
    # Whole samples are dropped together.
    first = out[:128].view(64, 2, 5)
    assert torch.equal(first.amin(dim=(1, 2)), first.amax(dim=(1, 2)))
    mean = torch.stack([drop_path(ones, 0.1, layout, True) for _ in range(400)]).mean()
    assert abs(mean.item() - 1.0) < 0.02
    assert torch.equal(drop_path(ones, 0.1, layout, training=False), ones)


def test_block_drop_path_skips_rows_in_training_only():
    model = vit_tiny(depth=2, img_size=56, drop_path_rate=0.3)
    rows_seen = []
    model.blocks[0].mlp.register_forward_hook(lambda mod, inp, out: rows_seen.append(inp[0].shape[0]))
    images = [torch.randn(10, 3, 56, 56), torch.randn(20, 3, 28, 28)]
    model.train()
    model.forward_features(images)
    assert rows_seen == [7 * 17 + 14 * 5]  # floor(0.7 * B) samples of each crop group
    model.eval()
    rows_seen.clear()
    with torch.no_grad():
        model.forward_features(images)
    assert rows_seen == [10 * 17 + 20 * 5]


# ------------------------------------------------------------------ init, builders
def test_reference_init_and_builders():
    torch.manual_seed(0)
    model = vit_small(img_size=224, depth=4, num_register_tokens=4)
    # Reference trunc_normal(std=0.02) truncates at +-2 (absolute), i.e. practically never.
    assert abs(model.pos_embed.std().item() - 0.02) < 0.002 and abs(model.pos_embed.mean().item()) < 0.002
    assert model.cls_token.abs().max() < 1e-5 and model.register_tokens.abs().max() < 1e-5
    assert model.cls_token.abs().max() > 0
    assert torch.count_nonzero(model.mask_token) == 0
    assert torch.all(model.blocks[3].ls2.gamma == 1e-5)
    qkv = model.blocks[0].attn.qkv
    assert abs(qkv.weight.std().item() - 0.02) < 0.002 and torch.count_nonzero(qkv.bias) == 0
    assert type(vit_small(init_values=None, depth=1).blocks[0].ls1) is torch.nn.Identity
    with torch.device("meta"):
        tiny = build_model("vit_tiny")
        assert (tiny.embed_dim, tiny.num_heads, len(tiny.blocks)) == (192, 3, 12)
        assert build_model("vit_base", patch_size=16, img_size=224).pos_embed.shape == (1, 197, 768)
        assert build_model("vit_large", patch_size=8, img_size=224).patch_embed.proj.weight.shape[-1] == 8
        rates = [b.drop_path_rate for b in vit_tiny(drop_path_rate=0.3, drop_path_uniform=False).blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3) and rates == sorted(rates)
    with pytest.raises(ValueError, match="unknown arch"):
        build_model("vit_huge")
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        vit_tiny(img_size=100)
    assert attention_backend("cpu") == "sdpa"


def test_sincos_position_init_matches_formula():
    torch.manual_seed(0)
    model = vit_tiny(img_size=84, depth=1, pos_embed_init="sincos")  # 6 x 6 grid, dim 192
    table = model.pos_embed.detach()[0].double()
    assert model.pos_embed.requires_grad and table.shape == (37, 192)
    assert torch.count_nonzero(table[0]) == 0  # CLS row
    quarter = 192 // 4
    for row, col in [(0, 0), (2, 5), (5, 1)]:
        token = table[1 + row * 6 + col]
        for i in (0, 7, quarter - 1):
            freq = 10000.0 ** (-i / quarter)
            expect = [math.sin(row * freq), math.cos(row * freq), math.sin(col * freq), math.cos(col * freq)]
            got = [token[i], token[quarter + i], token[2 * quarter + i], token[3 * quarter + i]]
            assert [float(g) for g in got] == pytest.approx(expect, abs=1e-6)
    # Every patch gets its own code; a second model starts from the same table.
    assert len({tuple(r.tolist()) for r in table[1:]}) == 36
    assert torch.equal(vit_tiny(img_size=84, depth=1, pos_embed_init="sincos").pos_embed, model.pos_embed)
    out = model.forward_features(torch.randn(2, 3, 42, 56))  # interpolated to other grids as usual
    assert out["x_norm_patchtokens"].shape == (2, 12, 192)
    with pytest.raises(ValueError, match="pos_embed_init"):
        vit_tiny(depth=1, pos_embed_init="learned")
    with pytest.raises(ValueError, match="divisible by 4"):
        DinoVisionTransformer(img_size=28, embed_dim=66, depth=1, num_heads=1, pos_embed_init="sincos")


def test_load_pretrained_unwraps_training_checkpoints(tmp_path):
    state = dino2021_state(16, 192, depth=2)
    reference = load_pretrained(state)
    images = random_images(2, 64, 64)
    with torch.no_grad():
        expected = reference(images)

    head = {"head.mlp.0.weight": torch.randn(4, 192), "head.last_layer.weight_g": torch.ones(4, 1)}
    teacher = {f"module.backbone.{k}": v for k, v in state.items()} | {
        f"module.{k}": v for k, v in head.items()
    }
    student = {f"backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
    dino_checkpoint = {
        "student": student,
        "teacher": teacher,
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small"),
    }
    torch.save(dino_checkpoint, tmp_path / "checkpoint.pth")
    # DINOv2 training layout: model.{teacher,student}.backbone with chunked blocks.
    chunked = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{index}." + key.split(".", 2)[2]  # chunks of 2 blocks
        chunked[f"teacher.backbone.{key}"] = value
        chunked[f"student.backbone.{key}"] = torch.zeros_like(value)
    cases = [
        tmp_path / "checkpoint.pth",
        {"model": chunked, "iteration": 5},
        {"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}},
    ]
    for case in cases:
        with torch.no_grad():
            assert max_diff(load_pretrained(case)(images), expected) == 0.0, case
    overridden = load_pretrained(state, drop_path_rate=0.3)
    assert overridden.blocks[0].drop_path_rate == 0.3


def test_load_pretrained_reports_bad_files_clearly(tmp_path):
    state = dino2021_state(16, 192, depth=2)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_pretrained(tmp_path / "absent.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pretrained(tmp_path / "empty.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth: not a PyTorch checkpoint"):
        load_pretrained(tmp_path / "garbage.pth")
    torch.save(state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])  # e.g. an interrupted download
    with pytest.raises(CheckpointError, match="truncated.pth: not a readable PyTorch checkpoint"):
        load_pretrained(tmp_path / "truncated.pth")
    torch.save({"model": state, "extra": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")
    with pytest.raises(CheckpointError, match="weights_only.*torch.nn.modules.linear.Linear"):
        load_pretrained(tmp_path / "pickled_module.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="not a state dict.*list"):
        load_pretrained(tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="top-level keys: 'epoch', 'optimizer'"):
        load_pretrained({"epoch": 3, "optimizer": {"lr": 1.0}})
    with pytest.raises(CheckpointError, match="not a ViT backbone state dict"):
        load_pretrained({"fc.weight": torch.zeros(3, 3)})

    missing = dict(state)
    del missing["blocks.1.norm1.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: 'blocks.1.norm1.weight'"):
        load_pretrained(missing)
    extra = dict(state, **{"blocks.0.attn.q_norm.weight": torch.zeros(192)})
    with pytest.raises(CheckpointError, match=r"unexpected keys: 'blocks.0.attn.q_norm.weight'"):
        load_pretrained(extra)
    wrong = dict(state, **{"blocks.1.mlp.fc2.weight": torch.zeros(192, 100)})
    with pytest.raises(
        CheckpointError, match=r"shape mismatches: 'blocks.1.mlp.fc2.weight: file \(192, 100\)"
    ):
        load_pretrained(wrong)
    gap = {k: v for k, v in state.items() if not k.startswith("blocks.0.")}
    with pytest.raises(CheckpointError, match="missing|not contiguous"):
        load_pretrained(gap)
    bad_grid = dict(state, pos_embed=torch.zeros(1, 200, 192))
    with pytest.raises(CheckpointError, match="not a square grid"):
        load_pretrained(bad_grid)
    torch.save(dict(state, **{"blocks.0.norm1.weight": "oops"}), tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match="str.pth: .*not tensors: 'blocks.0.norm1.weight'"):
        load_pretrained(tmp_path / "str.pth")
