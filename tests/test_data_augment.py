"""Multi-crop augmentation: shapes, per-crop probabilities (blur not inverted), seeding, decoding."""
from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from conftest import encode
from PIL import Image
from torchvision.transforms.v2 import functional as F

from dinov2.data.augment import ColourOpsOn, CropsConfig, DataAugmentationDINO, _hue_shift, decode_for_crops
from dinov2.data.decode import DecodeError
from dinov2.utils.config import ConfigError, load_config


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut())  # 512 x 512 real photo



def test_crop_shapes_and_normalisation(astronaut):
    aug = DataAugmentationDINO()  # reference sizes: 2 x 224, 8 x 98
    out = aug(astronaut, np.random.default_rng(0))
    assert [tuple(t.shape) for t in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [tuple(t.shape) for t in out["local_crops"]] == [(3, 98, 98)] * 8
    for t in out["global_crops"] + out["local_crops"]:
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
        # ImageNet-normalised pixel range: (0 - 0.485)/0.229 .. (1 - 0.406)/0.225
        assert t.min() >= -2.2 and t.max() <= 2.7
    # Non-square sizes and a non-default local count.
    aug2 = DataAugmentationDINO(local_crops_number=3, global_crops_size=112, local_crops_size=42)
    out2 = aug2(astronaut.crop((0, 0, 300, 120)), np.random.default_rng(1))
    assert len(out2["local_crops"]) == 3 and out2["local_crops"][0].shape == (3, 42, 42)
    assert out2["global_crops"][1].shape == (3, 112, 112)


def test_same_seed_same_crops_different_seed_different(astronaut):
    aug = DataAugmentationDINO(local_crops_number=2, global_crops_size=64, local_crops_size=32)
    a = aug(astronaut, np.random.default_rng([7, 1]))
    b = aug(astronaut, np.random.default_rng([7, 1]))
    c = aug(astronaut, np.random.default_rng([7, 2]))
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])


def test_per_crop_probabilities_match_config_not_inverted():
    aug = DataAugmentationDINO()
    n = 10000
    counts = {k: np.zeros(6) for k in ("global1", "global2", "local")}
    totals = {"global1": 0, "global2": 0, "local": 0}
    rng = np.random.default_rng(123)
    for _ in range(n // 10):
        for p in aug.sample_params(rng, 400, 300):
            counts[p.kind] += [p.blur, p.solarize, p.flip, p.jitter, p.grayscale, 1]
            totals[p.kind] += 1
    rate = {k: v / totals[k] for k, v in counts.items()}
    blur, sol, flip, jit, gray = 0, 1, 2, 3, 4
    assert rate["global1"][blur] == 1.0  # always blurred (the reference's inverted code never blurs it)
    assert abs(rate["global2"][blur] - 0.1) < 0.035
    assert abs(rate["local"][blur] - 0.5) < 0.03
    assert abs(rate["global2"][sol] - 0.2) < 0.04
    assert rate["global1"][sol] == 0 and rate["local"][sol] == 0
    for k in rate:
        assert abs(rate[k][flip] - 0.5) < 0.06
        assert abs(rate[k][jit] - 0.8) < 0.05
        assert abs(rate[k][gray] - 0.2) < 0.05


def test_blur_probability_is_configurable():
    cfg = CropsConfig(blur_p_global1=0.0, blur_p_global2=1.0, blur_p_local=0.0)
    aug = DataAugmentationDINO.from_config(cfg)
    params = aug.sample_params(np.random.default_rng(0), 200, 200)
    assert [p.blur for p in params] == [False, True] + [False] * 8


def test_params_are_really_applied(astronaut):
    aug = DataAugmentationDINO(global_crops_size=96)
    p = aug.sample_params(np.random.default_rng(5), astronaut.width, astronaut.height)[0]
    plain = p.__class__(**{**p.__dict__, "blur": False, "jitter": False, "grayscale": False, "flip": False})
    base = aug.apply_crop(astronaut, plain)
    blurred = aug.apply_crop(astronaut, p.__class__(**{**plain.__dict__, "blur": True, "sigma": 2.0}))
    # Blur removes high frequencies: neighbouring-pixel differences shrink.
    hf = lambda t: (t[:, :, 1:] - t[:, :, :-1]).abs().mean()
    assert hf(blurred) < 0.7 * hf(base)
    flipped = aug.apply_crop(astronaut, p.__class__(**{**plain.__dict__, "flip": True}))
    assert torch.allclose(flipped, base.flip(-1))
    gray = aug.apply_crop(astronaut, p.__class__(**{**plain.__dict__, "grayscale": True}))
    std = torch.tensor(aug.cfg.std).view(3, 1, 1)
    mean = torch.tensor(aug.cfg.mean).view(3, 1, 1)
    raw = gray * std + mean
    assert (raw[0] - raw[1]).abs().max() < 1e-5 and (raw[1] - raw[2]).abs().max() < 1e-5
    sol = aug.apply_crop(astronaut, p.__class__(**{**plain.__dict__, "solarize": True}))
    raw_b, raw_s = base * std + mean, sol * std + mean
    bright = raw_b >= 128 / 255 + 1e-4
    assert torch.allclose(raw_s[bright], 1 - raw_b[bright], atol=1e-4)


def test_hue_shift_matches_torchvision(astronaut):
    small = astronaut.resize((96, 96))
    arr = np.asarray(small)
    exact = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    for hue in (-0.1, -0.03, 0.05, 0.1):
        pil = np.asarray(F.adjust_hue(small, hue), dtype=int)  # the reference's PIL kernel
        ours = _hue_shift(arr, hue).astype(int)
        diff = np.abs(pil - ours)
        assert diff.max() <= 8 and diff.mean() < 0.6, (hue, diff.max(), diff.mean())
        ref = F.adjust_hue(exact, hue).permute(1, 2, 0).numpy().astype(int)  # exact float HSV
        assert np.abs(ref - ours).mean() < 1.5
    assert _hue_shift(arr, 0.0) is arr
    # A real rotation: pure red turns to yellow for a shift of 1/6 turn (+ the 8-bit quantisation).
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert _hue_shift(red, 1 / 6 + 1 / 255)[0, 0].tolist() == pytest.approx([255, 255, 0], abs=3)


def test_draft_decoding_keeps_enough_pixels(astronaut):
    big = astronaut.resize((2048, 1536))
    aug = DataAugmentationDINO()
    img = aug.decode(encode(big))
    assert img.mode == "RGB"
    assert img.width * img.height >= aug.min_decode_area
    assert img.width < 2048  # decoded at a reduced scale
    full = decode_for_crops(encode(big), aug.min_decode_area, draft=False)
    assert full.size == (2048, 1536)
    small = aug.decode(encode(astronaut))
    assert small.size == (512, 512)  # no reduction when it would lose pixels
    # EXIF orientation is honoured on the draft path too.
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    rotated = aug.decode(encode(big, exif=exif.tobytes()))
    assert rotated.height > rotated.width


def test_decode_failures_have_reasons(astronaut):
    aug = DataAugmentationDINO()
    data = encode(astronaut.resize((1600, 1600)))
    with pytest.raises(DecodeError) as e:
        aug.decode(data[: len(data) // 2])
    assert e.value.reason == "truncated"
    with pytest.raises(DecodeError) as e:
        aug.decode(b"")
    assert e.value.reason == "empty"
    with pytest.raises(DecodeError) as e:
        aug.decode(b"\xff\xd8\xff" + b"garbage" * 50)
    assert e.value.reason in ("not_an_image", "corrupt", "truncated")
    # Odd modes still give RGB crops.
    for mode in ("L", "CMYK", "P"):
        buf = io.BytesIO()
        (astronaut.convert(mode)).save(buf, "PNG" if mode == "P" else "JPEG")
        img = aug.decode(buf.getvalue())
        assert img.mode == "RGB"
        aug(img, np.random.default_rng(0))


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="global_crops_scale"):
        DataAugmentationDINO.from_config(CropsConfig(global_crops_scale=[0.5, 0.2]))
    with pytest.raises(ConfigError, match="blur_p_local"):
        DataAugmentationDINO.from_config(CropsConfig(blur_p_local=1.5))
    path = tmp_path / "c.yaml"
    path.write_text("local_crops_size: 96\nblur_sigma: [0.2, 1.0]\n")
    cfg = load_config(CropsConfig, path, ["blur_p_global2=0.3"])
    assert cfg.local_crops_size == 96 and cfg.blur_sigma == [0.2, 1.0] and cfg.blur_p_global2 == 0.3
    assert cfg.colour_ops_on == ColourOpsOn.cpu
    assert load_config(CropsConfig, None, ["colour_ops_on=cuda"]).colour_ops_on == ColourOpsOn.cuda
    with pytest.raises(ConfigError, match="colour_ops_on"):
        load_config(CropsConfig, None, ["colour_ops_on=gpu"])
