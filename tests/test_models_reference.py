"""ViT backbone vs an independent reference forward: official checkpoints, interpolation, packing, DINO."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.models import (
    DinoVisionTransformer,
    export_official,
    infer_architecture,
    interpolate_pos_embed,
    load_pretrained,
    save_official,
    vit_base,
    vit_small,
    vit_tiny,
)

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
        batch.append(
            F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        )
    return (torch.cat(batch) - MEAN) / STD


def randomized_state(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict for ``model`` (may live on the meta device) with non-trivial values.

    LayerScale ~ U(0.2, 1) instead of 1e-5 so every block really changes the output.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(shape, low, high):  # uniform: several times cheaper than randn for ViT-B sizes
        return torch.empty(shape).uniform_(low, high, generator=gen)

    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(".gamma"):
            new = uniform(value.shape, 0.2, 1.0)
        elif "norm" in key and key.endswith(".weight"):
            new = uniform(value.shape, 0.8, 1.2)
        elif key in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
            new = uniform(value.shape, -1.0, 1.0)
        else:
            bound = math.sqrt(3.0 / (value[0].numel() if value.dim() > 1 else 1))  # unit output variance
            new = uniform(value.shape, -bound, bound)
        state[key] = new
    return state


def meta_model(builder, **kwargs):
    with torch.device("meta"):  # only shapes are needed: skip the (slow) weight init
        return builder(**kwargs)


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
            grid,
            scale_factor=((grid_h + offset) / m, (grid_w + offset) / m),
            mode="bicubic",
            antialias=antialias,
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


@pytest.mark.parametrize("registers", [0, 4])
def test_vit_small_numeric_round_trip_matches_reference(tmp_path, registers):
    state = randomized_state(meta_model(vit_small, num_register_tokens=registers), seed=registers)
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
    state = randomized_state(meta_model(vit_base), seed=3)
    loaded = load_pretrained(state)
    images = photo_batch(70, 56, count=1)
    with torch.no_grad():
        ours = loaded.forward_features(images)
        ref = reference_forward(state, images, 14, 12, 0.1, False)
    assert_close(ours["x_prenorm"], ref["x_prenorm"])
    assert_close(ours["x_norm_clstoken"], ref["x_norm_clstoken"])
    # giant2's fused SwiGLU on a shallow model (same block code as the 40-block one).
    small_swiglu = meta_model(DinoVisionTransformer, embed_dim=192, depth=2, ffn_layer="swiglufused")
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
        other = reference_pos_embed(
            model.pos_embed.detach(), height // 14, width // 14, 0.1 - offset, not antialias
        )
        assert max_diff(ours, other) > 1e-4


def test_pos_embed_interpolation_is_fp32_and_cast_to_tokens():
    pos = torch.randn(1, 1 + 16 * 16, 8)
    resized = interpolate_pos_embed(pos.half(), 7, 5, antialias=False, offset=0.1)
    assert resized.dtype == torch.float32
    assert max_diff(resized, reference_pos_embed(pos.half(), 7, 5, 0.1, False)) == 0.0
    model = vit_tiny(depth=1, img_size=224)
    assert (
        model.interpolate_pos_encoding(torch.zeros(1, 1, 192, dtype=torch.bfloat16), 98, 98).dtype
        == torch.bfloat16
    )


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


# ------------------------------------------------------------- DINO (2021)
def dino2021_state(patch: int, dim: int, depth: int, seed: int) -> dict[str, torch.Tensor]:
    model = meta_model(
        DinoVisionTransformer, img_size=224, patch_size=patch, embed_dim=dim, depth=depth, init_values=None
    )
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
