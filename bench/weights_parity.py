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
from dinov2.models.formats.reference_models import all_tokens, build_hf, build_timm, hf_tokens, timm_tokens

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def photos(px: int) -> torch.Tensor:
    from skimage import data

    out = []
    for image in (data.astronaut(), data.chelsea()):
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().unsqueeze(0) / 255.0
        out.append(F.interpolate(t, size=(px, px), mode="bilinear", antialias=True, align_corners=False))
    return (torch.cat(out) - MEAN) / STD


def build(lib: str, size: str, registers: int, folder: Path):
    """The library's model and the file or folder it saves, as users would hand it to us."""
    if lib == "hf":
        model = build_hf(size, registers, seed=registers)
        model.save_pretrained(folder)
        return (lambda x: hf_tokens(model, x)), folder
    from safetensors.torch import save_file

    model = build_timm(size, registers, seed=registers)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return (lambda x: timm_tokens(model, x)), folder / "model.safetensors"


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
                        diffs.append((all_tokens(model, x) - ref).abs().max().item())
                    diffs.append((all_tokens(wrong, x) - ref).abs().max().item())
                print(f"| {lib} | {size}/14 | {registers} | {diffs[0]:.1e} | {diffs[1]:.1e} | {diffs[2]:.2f} "
                      f"| {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
