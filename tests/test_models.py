"""ViT backbone: official layout, reference-equal forward, packing, drop path, checkpoint loading."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.models import (
    CheckpointError,
    DinoVisionTransformer,
    TokenLayout,
    attention_backend,
    build_model,
    export_official,
    infer_architecture,
    interpolate_pos_embed,
    load_pretrained,
    save_official,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinov2.models.drop_path import drop_add_residual_subset, drop_path, residual_with_drop_path

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- helpers
def photo_batch(height: int, width: int, count: int = 2) -> torch.Tensor:
    """Real photos (scikit-image samples) resized and normalised like the DINO transforms."""
    from skimage import data

    images = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()][:count]
    batch = []
    for image in images:
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().unsqueeze(0) / 255.0
        batch.append(F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(batch) - MEAN) / STD


def randomized_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's official-layout state dict with non-trivial values (LayerScale ~ 0.5, not 1e-5)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in export_official(model).items():
        if key.endswith(".gamma"):
            new = torch.rand(value.shape, generator=gen) * 0.8 + 0.2
        elif "norm" in key and key.endswith(".weight"):
            new = 1.0 + 0.1 * torch.randn(value.shape, generator=gen)
        elif key in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            new = 0.5 * torch.randn(value.shape, generator=gen)
        else:
            fan_in = value[0].numel() if value.dim() > 1 else 1
            new = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in)
        state[key] = new
    return state


def reference_pos_embed(pos_embed, grid_h, grid_w, offset, antialias):
    """The official interpolation formula, written out directly."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    if grid_h == m and grid_w == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    if offset:
        grid = F.interpolate(
            grid, scale_factor=((grid_h + offset) / m, (grid_w + offset) / m), mode="bicubic", antialias=antialias
        )
    else:
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", antialias=antialias)
    return torch.cat([pos_embed[:, :1].float(), grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def reference_forward(sd, images, patch, num_heads, offset, antialias, masks=None, eps=1e-6):
    """Straightforward official-architecture forward over a flat state dict (plain loops and math)."""
    dim = sd["cls_token"].shape[-1]
    num_reg = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    feats = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    batch, _, grid_h, grid_w = feats.shape
    x = feats.flatten(2).transpose(1, 2)
    if masks is not None:
        x = torch.where(masks[..., None], sd["mask_token"][None], x)
    x = torch.cat([sd["cls_token"].expand(batch, -1, -1), x], dim=1)
    x = x + reference_pos_embed(sd["pos_embed"], grid_h, grid_w, offset, antialias)
    if num_reg:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(batch, -1, -1), x[:, 1:]], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    head_dim = dim // num_heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps)
        qkv = h @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]
        q, k, v = qkv.reshape(batch, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        h = h @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        if p + "ls1.gamma" in sd:
            h = h * sd[p + "ls1.gamma"]
        x = x + h
        h = F.layer_norm(x, (dim,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps)
        if p + "mlp.fc1.weight" in sd:
            h = F.gelu(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
            h = h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        else:
            gate, value = (h @ sd[p + "mlp.w12.weight"].T + sd[p + "mlp.w12.bias"]).chunk(2, dim=-1)
            h = (F.silu(gate) * value) @ sd[p + "mlp.w3.weight"].T + sd[p + "mlp.w3.bias"]
        if p + "ls2.gamma" in sd:
            h = h * sd[p + "ls2.gamma"]
        x = x + h
    normed = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps)
    return {
        "x_norm_clstoken": normed[:, 0],
        "x_norm_regtokens": normed[:, 1 : 1 + num_reg],
        "x_norm_patchtokens": normed[:, 1 + num_reg :],
        "x_prenorm": x,
    }


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def assert_close(ours, ref, what="") -> None:
    """Max abs diff <= 1e-5, relative to the magnitude when activations exceed 1 (fp32 sums)."""
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    assert max_diff(ours, ref) <= 1e-5 * scale, (what, max_diff(ours, ref), scale)


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
        shapes.update({p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,), p + "ls1.gamma": (dim,)})
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
    assert inferred["ffn_layer"] == ("swiglufused" if swiglu else "mlp") and inferred["ffn_hidden_features"] == hidden
    if arch == "vit_giant2":
        assert sum(p.numel() for p in model.parameters()) > 1.1e9


@pytest.mark.parametrize("registers", [0, 4])
def test_vit_small_numeric_round_trip_matches_reference(tmp_path, registers):
    model = vit_small(num_register_tokens=registers)
    state = randomized_state(model, seed=registers)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    loaded = load_pretrained(path)
    assert loaded.num_register_tokens == registers and loaded.interpolate_antialias == bool(registers)
    exported = export_official(loaded)
    assert list(exported) == list(state)
    assert all(torch.equal(exported[k], state[k]) for k in state)
    offset, antialias = (0.0, True) if registers else (0.1, False)
    for height, width in [(224, 224), (98, 56)]:
        images = photo_batch(height, width, count=2 if height == 224 else 1)
        with torch.no_grad():
            ours = loaded.forward_features(images)
            ref = reference_forward(state, images, 14, 6, offset, antialias)
        for key in ref:
            assert_close(ours[key], ref[key], (key, height, width))
        assert ours["x_norm_regtokens"].shape == (images.shape[0], registers, 384)
    # save_official writes a file the loader reads back to identical weights.
    save_official(loaded, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert all(torch.equal(again[k], state[k]) for k in state)


def test_vit_base_and_giant_style_swiglu_match_reference():
    model = vit_base()
    state = randomized_state(model, seed=3)
    loaded = load_pretrained(state)
    images = photo_batch(70, 56, count=1)
    with torch.no_grad():
        ours = loaded.forward_features(images)
        ref = reference_forward(state, images, 14, 12, 0.1, False)
    assert_close(ours["x_prenorm"], ref["x_prenorm"])
    assert_close(ours["x_norm_clstoken"], ref["x_norm_clstoken"])
    # giant2's fused SwiGLU on a shallow model (same block code as the 40-block one).
    small_swiglu = DinoVisionTransformer(embed_dim=192, depth=2, ffn_layer="swiglufused")
    assert small_swiglu.blocks[0].mlp.w3.in_features == (int(768 * 2 / 3) + 7) // 8 * 8
    state = randomized_state(small_swiglu, seed=4)
    loaded = load_pretrained(state)
    assert infer_architecture(state)["ffn_layer"] == "swiglufused"
    images = photo_batch(70, 126, count=2)
    with torch.no_grad():
        ours = loaded.forward_features(images)
        ref = reference_forward(state, images, 14, 3, 0.1, False)
    assert_close(ours["x_norm_patchtokens"], ref["x_norm_patchtokens"])


# ---------------------------------------------------------- position interpolation
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("size", [(224, 224), (98, 98), (518, 518), (224, 98), (98, 518)])
def test_pos_embed_interpolation_matches_official_formula(size, registers):
    model = vit_tiny(num_register_tokens=registers, depth=1)
    if registers:
        assert model.interpolate_offset == 0.1  # constructor defaults; register models set these explicitly
        model.interpolate_offset, model.interpolate_antialias = 0.0, True
    height, width = size
    tokens = torch.zeros(1, 1, 192)
    ours = model.interpolate_pos_encoding(tokens, height, width)
    offset, antialias = (0.0, True) if registers else (0.1, False)
    ref = reference_pos_embed(model.pos_embed.detach(), height // 14, width // 14, offset, antialias)
    assert ours.shape == (1, (height // 14) * (width // 14) + 1, 192)
    assert max_diff(ours, ref) == 0.0
    assert torch.equal(ours[:, 0], model.pos_embed[:, 0])  # CLS position kept as is
    if size == (518, 518):
        assert ours.data_ptr() == model.pos_embed.data_ptr()  # skipped when the grid matches
    else:
        # The two official flavours really differ, so the test distinguishes them.
        other = reference_pos_embed(model.pos_embed.detach(), height // 14, width // 14, 0.1 - offset, not antialias)
        assert max_diff(ours, other) > 1e-4


def test_pos_embed_interpolation_is_fp32_and_cast_to_tokens():
    pos = torch.randn(1, 1 + 16 * 16, 8)
    resized = interpolate_pos_embed(pos.half(), 7, 5, antialias=False, offset=0.1)
    assert resized.dtype == torch.float32
    assert max_diff(resized, reference_pos_embed(pos.half(), 7, 5, 0.1, False)) == 0.0
    model = vit_tiny(depth=1, img_size=224)
    assert model.interpolate_pos_encoding(torch.zeros(1, 1, 192, dtype=torch.bfloat16), 98, 98).dtype == torch.bfloat16


# ------------------------------------------------------------------- packing
def test_packed_forward_equals_per_group_outputs_and_grads():
    torch.manual_seed(0)
    model = vit_tiny(depth=3, num_register_tokens=4, img_size=56)
    model.load_state_dict(randomized_state(model, seed=7))
    model.train()  # drop_path_rate 0: training mode without randomness
    global_crops = photo_batch(56, 56, count=2).requires_grad_(True)
    local_crops = photo_batch(28, 28, count=4).requires_grad_(True)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    masks[1, 3:11] = True

    packed = model.forward_features([global_crops, local_crops], [masks, None])
    loss = sum((out["x_norm_patchtokens"] ** 2).mean() + out["x_norm_clstoken"].sum() for out in packed)
    loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    packed_input_grads = [global_crops.grad.clone(), local_crops.grad.clone()]
    model.zero_grad()
    global_crops.grad = local_crops.grad = None

    single = [model.forward_features(global_crops, masks), model.forward_features(local_crops)]
    loss = sum((out["x_norm_patchtokens"] ** 2).mean() + out["x_norm_clstoken"].sum() for out in single)
    loss.backward()
    for a, b in zip(packed, single):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert a[key].shape == b[key].shape
            assert_close(a[key], b[key], key)
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None
    assert set(packed_grads) == {n for n, p in model.named_parameters() if p.grad is not None}
    assert "mask_token" in packed_grads and packed_grads["mask_token"].abs().sum() > 0
    for name, grad in packed_grads.items():
        ref = dict(model.named_parameters())[name].grad
        assert max_diff(grad, ref) <= 1e-5 * max(1.0, ref.abs().max().item()), name
    assert max_diff(packed_input_grads[0], global_crops.grad) < 1e-6
    assert max_diff(packed_input_grads[1], local_crops.grad) < 1e-6


def test_forward_modes_and_intermediate_layers():
    model = vit_tiny(depth=4, img_size=56).eval()
    model.load_state_dict(randomized_state(model, seed=9))
    images = photo_batch(42, 70, count=2)
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
    out = drop_add_residual_subset(x[:8], TokenLayout.single(4, 2), lambda t, lay: torch.ones_like(t), rate=0.5)
    per_sample = (out - x[:8]).view(4, 2, 4)[:, 0, 0]
    assert sorted(per_sample.tolist()) == [0.0, 0.0, 2.0, 2.0]
    # At least one sample is kept even at a very high rate.
    out = drop_add_residual_subset(x[:3], TokenLayout.single(1, 3), lambda t, lay: torch.ones_like(t), rate=0.95)
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


# --------------------------------------------------- DINO 2021, wrappers, errors
def dino2021_state(patch: int, dim: int, depth: int, seed: int) -> dict[str, torch.Tensor]:
    model = DinoVisionTransformer(img_size=224, patch_size=patch, embed_dim=dim, depth=depth, init_values=None)
    state = randomized_state(model, seed=seed)
    del state["mask_token"]  # DINO (2021) backbones have none
    return state


@pytest.mark.parametrize("patch,dim,heads", [(16, 384, 6), (8, 192, 3)])
def test_load_pretrained_dino2021_backbones(tmp_path, patch, dim, heads):
    state = dino2021_state(patch, dim, depth=2, seed=patch)
    assert not any(".ls1." in k for k in state)
    path = tmp_path / f"dino_vit{patch}_pretrain.pth"
    torch.save(state, path)
    model = load_pretrained(path)
    assert (model.patch_size, model.img_size, model.embed_dim, model.num_heads) == (patch, 224, dim, heads)
    assert model.init_values is None and model.num_register_tokens == 0
    assert torch.count_nonzero(model.mask_token) == 0
    for height, width in [(224, 224), (160, 96)]:
        images = photo_batch(height, width)
        with torch.no_grad():
            ours = model.forward_features(images)
            ref = reference_forward(state, images, patch, heads, offset=0.1, antialias=False)
        assert_close(ours["x_norm_clstoken"], ref["x_norm_clstoken"])
        assert_close(ours["x_norm_patchtokens"], ref["x_norm_patchtokens"])


def test_load_pretrained_unwraps_training_checkpoints(tmp_path):
    state = dino2021_state(16, 192, depth=2, seed=5)
    reference = load_pretrained(state)
    images = photo_batch(64, 64)
    with torch.no_grad():
        expected = reference(images)

    head = {"head.mlp.0.weight": torch.randn(4, 192), "head.last_layer.weight_g": torch.ones(4, 1)}
    teacher = {f"module.backbone.{k}": v for k, v in state.items()} | {f"module.{k}": v for k, v in head.items()}
    student = {f"backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
    dino_checkpoint = {"student": student, "teacher": teacher, "epoch": 100, "args": argparse.Namespace(arch="vit_small")}
    torch.save(dino_checkpoint, tmp_path / "checkpoint.pth")
    # DINOv2 training layout: model.{teacher,student}.backbone with chunked blocks.
    chunked = {}
    for key, value in state.items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{index}." + key.split(".", 2)[2]  # chunks of 2 blocks
        chunked[f"teacher.backbone.{key}"] = value
        chunked[f"student.backbone.{key}"] = torch.zeros_like(value)
    cases = [tmp_path / "checkpoint.pth", {"model": chunked, "iteration": 5}, {"state_dict": {f"_orig_mod.{k}": v for k, v in state.items()}}]
    for case in cases:
        with torch.no_grad():
            assert max_diff(load_pretrained(case)(images), expected) == 0.0, case
    overridden = load_pretrained(state, drop_path_rate=0.3)
    assert overridden.blocks[0].drop_path_rate == 0.3


def test_load_pretrained_reports_bad_files_clearly(tmp_path):
    state = dino2021_state(16, 192, depth=2, seed=6)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_pretrained(tmp_path / "absent.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_pretrained(tmp_path / "empty.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_pretrained(tmp_path / "garbage.pth")
    torch.save({"model": state, "extra": torch.nn.Linear(2, 2)}, tmp_path / "pickled_module.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
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
    with pytest.raises(CheckpointError, match=r"shape mismatches: 'blocks.1.mlp.fc2.weight: file \(192, 100\)"):
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
