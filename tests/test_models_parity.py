"""Parity with the real libraries (transformers, timm from PyPI; models built at random init, no
downloads): convert both ways, compare CLS + register + patch tokens at 224 px and at 280 px (where
each library resizes its position table), fp32 max abs diff <= 1e-4."""
from __future__ import annotations

import pytest
import torch
from test_models_reference import meta_model, photo_batch, randomized_state

from dinov2.cli import main
from dinov2.models import export_official, load_pretrained, vit_small
from dinov2.models.export import export_weights
from dinov2.models.formats.reference_models import (
    SHAPES,
    build_hf,
    build_timm,
    hf_tokens,
    perturb_,
    timm_name,
    timm_tokens,
)
from dinov2.models.formats.reference_models import all_tokens as ours_tokens

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4
SIZES = (224, 280)  # 224: the models' own 16x16 grid; 280: 20x20, positions resized


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# S/14 with and without registers (the two model classes of transformers, timm's two names); B/14
# once, with registers: what B adds is the width / head count, which does not depend on registers.
SIZE_REGISTERS = [("S", 0), ("S", 4), pytest.param("B", 4, marks=pytest.mark.slow)]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("size", "registers"), SIZE_REGISTERS)
def test_hf_both_ways(tmp_path, size, registers):
    from transformers import AutoModel

    original = build_hf(size, registers, seed=registers + 1)
    original.save_pretrained(tmp_path / "from_hf")
    ours = load_pretrained(tmp_path / "from_hf")
    assert ours.num_heads == SHAPES[size][1] and ours.num_register_tokens == registers
    # transformers 5 in-memory names (q_proj …) and no config.json: the same model.
    assert same_weights(load_pretrained(original.state_dict()).state_dict(), ours.state_dict())
    export_weights(ours, tmp_path / "to_hf", "hf")
    back = AutoModel.from_pretrained(tmp_path / "to_hf").eval()
    assert type(back) is type(original)
    assert same_weights(back.state_dict(), original.state_dict())  # bit for bit: same outputs
    for px in SIZES:
        images = photo_batch(px, px, count=1)
        reference = hf_tokens(original, images)
        assert max_diff(ours_tokens(ours, images), reference) <= TOL, px
    # The check can fail: the official resize rule differs from HF's at 280 px.
    wrong = load_pretrained(tmp_path / "from_hf", interpolate_offset=0.1, interpolate_antialias=not registers)
    assert max_diff(ours_tokens(wrong, images), reference) > 1e-2


@pytest.mark.parametrize(("size", "registers"), SIZE_REGISTERS)
def test_timm_both_ways(tmp_path, size, registers):
    original, name = build_timm(size, registers, seed=registers + 7), timm_name(size, registers)
    safetensors_torch.save_file(original.state_dict(), str(tmp_path / "timm.safetensors"))
    torch.save(original.state_dict(), tmp_path / "timm.pth")
    ours = load_pretrained(tmp_path / "timm.safetensors")
    assert same_weights(load_pretrained(tmp_path / "timm.pth").state_dict(), ours.state_dict())
    assert ours.num_register_tokens == registers and ours.interpolate_antialias
    export_weights(ours, tmp_path / "back.safetensors", "timm")
    export_weights(ours, tmp_path / "back.pth", "timm")
    for file, state in [("back.safetensors", safetensors_torch.load_file(str(tmp_path / "back.safetensors"))),
                        ("back.pth", torch.load(tmp_path / "back.pth", weights_only=True))]:
        back = timm.create_model(name, pretrained=False, img_size=224, dynamic_img_size=True, num_classes=0)
        back.load_state_dict(state, strict=True)
        assert same_weights(back.state_dict(), original.state_dict()), file
    for px in SIZES:
        images = photo_batch(px, px, count=1)
        assert max_diff(ours_tokens(ours, images), timm_tokens(original, images)) <= TOL, px


@pytest.mark.parametrize("registers", [0, 4])
def test_official_to_hf_to_official_is_bit_identical(tmp_path, registers):
    from transformers import AutoModel

    # Official layout on a 16x16 grid (img_size 224; the released files have 37x37, same keys).
    state = randomized_state(meta_model(vit_small, num_register_tokens=registers, img_size=224), seed=11 + registers)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")
    assert main(["export", str(tmp_path / "dinov2_vits14_pretrain.pth"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["export", str(tmp_path / "hf"), str(tmp_path / "again.pth")]) == 0
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert list(again) == list(state)
    assert all(torch.equal(again[k], state[k]) for k in state)
    # transformers opens the folder and computes the official model's features on its own grid,
    # and (registers: the same resize rule) at 280 px.
    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    official = load_pretrained(tmp_path / "dinov2_vits14_pretrain.pth")
    for px in SIZES if registers else SIZES[:1]:
        images = photo_batch(px, px, count=1)
        assert max_diff(hf_tokens(hf, images), ours_tokens(official, images)) <= TOL, px


def test_timm_swiglu_packed_maps_to_fused_w12(tmp_path):
    """ViT-g layout (SwiGLU) on a small model: timm's packed fc1/fc2 are the official w12/w3."""
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    original = VisionTransformer(img_size=56, patch_size=14, embed_dim=96, depth=2, num_heads=3, init_values=1e-5,
                                 mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU,
                                 num_classes=0, dynamic_img_size=True).eval()
    perturb_(original, 0)
    # 3 heads at width 96: a timm state dict cannot say so (the width's default is 1), so pass it.
    ours = load_pretrained(original.state_dict(), num_heads=3)
    assert hasattr(ours.blocks[0].mlp, "w12")
    images = photo_batch(70, 70, count=2)
    assert max_diff(ours_tokens(ours, images), timm_tokens(original, images)) <= TOL
    assert max_diff(ours_tokens(load_pretrained(original.state_dict()), images), timm_tokens(original, images)) > 1e-3
    assert export_official(ours)["blocks.0.mlp.w12.weight"].shape == original.blocks[0].mlp.fc1.weight.shape
