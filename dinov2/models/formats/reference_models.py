"""transformers / timm DINOv2 models built at random init (no downloads), for the weight-format
parity tests and bench/weights_parity.py.

Every part is made to count: positions / CLS / registers ~ U(-1, 1) (a wrong resize mode then
shows), LayerScale ~ U(0.2, 1) (timm starts it at 1e-5), norm weights ~ U(0.8, 1.2).  Needs the
``dev`` extra (transformers, timm).
"""
from __future__ import annotations

import torch

# size -> (width, heads, timm architecture prefix); 12 blocks each.
SHAPES = {"S": (384, 6, "vit_small"), "B": (768, 12, "vit_base")}


def perturb_(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("position_embeddings", "pos_embed", "cls_token", "register_tokens", "reg_token"):
                p.copy_(torch.empty_like(p).uniform_(-1, 1, generator=gen))
            elif leaf in ("lambda1", "gamma"):
                p.copy_(torch.empty_like(p).uniform_(0.2, 1.0, generator=gen))
            elif "norm" in name and leaf == "weight":
                p.copy_(torch.empty_like(p).uniform_(0.8, 1.2, generator=gen))


def build_hf(size: str, registers: int, seed: int) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    dim, heads, _ = SHAPES[size]
    kw = {"hidden_size": dim, "num_hidden_layers": 12, "num_attention_heads": heads, "image_size": 224,
          "patch_size": 14}
    torch.manual_seed(seed)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    else:
        model = Dinov2Model(Dinov2Config(**kw))
    perturb_(model, seed)
    return model.eval()


def timm_name(size: str, registers: int) -> str:
    return f"{SHAPES[size][2]}_patch14_{'reg4_' if registers else ''}dinov2"


def build_timm(size: str, registers: int, seed: int) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(timm_name(size, registers), pretrained=False, img_size=224, dynamic_img_size=True,
                              num_classes=0)
    perturb_(model, seed)
    return model.eval()


@torch.no_grad()
def all_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Our backbone's CLS + register + patch tokens, in the order transformers and timm return them."""
    out = model.forward_features(images)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], dim=1)


@torch.no_grad()
def hf_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=images).last_hidden_state


@torch.no_grad()
def timm_tokens(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model.forward_features(images)
