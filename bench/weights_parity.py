"""Max abs differences between our backbone and transformers / timm models converted to it.

Each library's model is built at random init (no downloads) for S/14 and B/14, with and without 4
registers, with positions / CLS / registers ~ U(-1, 1) and LayerScale ~ U(0.2, 1) so every part
counts; converted with ``load_pretrained`` and compared (CLS + registers + patches, fp32) at 224 px
(the 16x16 grid the models are built for) and 280 px (positions resized).  The "wrong rule" column
loads the same file with the official resize rule instead of the library's.

    python bench/weights_parity.py            # prints a Markdown table for bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dinov2.models import load_pretrained

SHAPES = {"S": (384, 6, "vit_small"), "B": (768, 12, "vit_base")}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def photos(px: int) -> torch.Tensor:
    from skimage import data

    out = []
    for image in (data.astronaut(), data.chelsea()):
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().unsqueeze(0) / 255.0
        out.append(F.interpolate(t, size=(px, px), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(out) - MEAN) / STD


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


def ours(model, x):
    out = model.forward_features(x)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def build(lib: str, size: str, registers: int, folder: Path):
    dim, heads, arch = SHAPES[size]
    torch.manual_seed(registers)
    if lib == "hf":
        from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        kw = {"hidden_size": dim, "num_hidden_layers": 12, "num_attention_heads": heads, "image_size": 224,
              "patch_size": 14}
        model = (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
                 if registers else Dinov2Model(Dinov2Config(**kw)))
        perturb_(model, registers)
        model.eval().save_pretrained(folder)
        return (lambda x: model(pixel_values=x).last_hidden_state), folder
    import timm
    from safetensors.torch import save_file

    name = f"{arch}_patch14_{'reg4_' if registers else ''}dinov2"
    model = timm.create_model(name, pretrained=False, img_size=224, dynamic_img_size=True, num_classes=0)
    perturb_(model, registers)
    save_file(model.eval().state_dict(), str(folder / "model.safetensors"))
    return model.forward_features, folder / "model.safetensors"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["S", "B"])
    args = parser.parse_args()
    print("| library | model | registers | 224 px | 280 px | 280 px, wrong rule | seconds |")
    print("|---|---|---|---|---|---|---|")
    for lib in ("hf", "timm"):
        for size in args.sizes:
            for registers in (0, 4):
                start = time.perf_counter()
                with tempfile.TemporaryDirectory() as tmp:
                    folder = Path(tmp) / "m"
                    folder.mkdir()
                    reference, path = build(lib, size, registers, folder)
                    model = load_pretrained(path)
                    wrong = load_pretrained(path, interpolate_offset=0.1, interpolate_antialias=False)
                    diffs = []
                    for px in (224, 280):
                        x = photos(px)
                        ref = reference(x)
                        diffs.append((ours(model, x) - ref).abs().max().item())
                    diffs.append((ours(wrong, x) - ref).abs().max().item())
                print(f"| {lib} | {size}/14 | {registers} | {diffs[0]:.1e} | {diffs[1]:.1e} | {diffs[2]:.2f} "
                      f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
