"""The project's multi-crop draws follow the reference transforms' distributions; the fast kernels and
the device path reproduce the reference's pixels closely.

Reference draws are recorded from the real torchvision v1 transforms of
``dinov2.data.augment_reference`` by replacing the functional kernels they call with recorders (the
random parameters are drawn by the transforms themselves, from torch's seeded global RNG).
"""
from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

from dinov2.data import colour
from dinov2.data.augment import CropsConfig, DataAugmentationDINO
from dinov2.data.augment_device import apply_photometric, augment_batch, pack_params
from dinov2.data.augment_reference import INTENDED_BLUR_P, REFERENCE_BLUR_P, ReferenceMultiCrop
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator

W, H = 400, 300
N_IMAGES = 600
P_MIN = 1e-3  # fixed seeds: deterministic; equal distributions pass, a wrong one fails (see _power)
KINDS = ("global1", "global2", "local")


def _record_reference(monkeypatch, n_images: int) -> list[dict]:
    crops: list[dict] = []

    def rec(name):
        def fn(img, *args, **kwargs):
            if name == "resized_crop":
                i, j, h, w = args[:4]
                crops.append({"box": (j, i, w, h), "flip": False, "jitter": [], "factors": {},
                              "grayscale": False, "blur": False, "sigma": None, "solarize": False})
            elif name == "hflip":
                crops[-1]["flip"] = True
            elif name.startswith("adjust_"):
                crops[-1]["jitter"].append(name)
                crops[-1]["factors"][name] = float(args[0])
            elif name == "rgb_to_grayscale":
                crops[-1]["grayscale"] = True
            elif name == "gaussian_blur":
                assert list(args[0]) == [9, 9]
                crops[-1]["blur"], crops[-1]["sigma"] = True, float(args[1][0])
            elif name == "solarize":
                assert args[0] == 128
                crops[-1]["solarize"] = True
            return img
        return fn

    for name in ("resized_crop", "hflip", "adjust_brightness", "adjust_contrast", "adjust_saturation",
                 "adjust_hue", "rgb_to_grayscale", "gaussian_blur", "solarize", "to_tensor", "normalize"):
        monkeypatch.setattr(TF, name, rec(name))
    torch.manual_seed(0)
    aug = ReferenceMultiCrop()
    img = Image.new("RGB", (W, H))
    for _ in range(n_images):
        aug(img)
    kinds = ["global1", "global2"] + ["local"] * 8
    for k, c in enumerate(crops):
        c["kind"] = kinds[k % 10]
    assert len(crops) == 10 * n_images
    return crops


_ORDER = ("adjust_brightness", "adjust_contrast", "adjust_saturation", "adjust_hue")


def _ours(cfg: CropsConfig, n_images: int, seed: int = 0) -> list[dict]:
    aug = DataAugmentationDINO.from_config(cfg)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        for p in aug.sample_params(rng, W, H):
            out.append({"kind": p.kind, "box": p.box, "flip": p.flip,
                        "jitter": [_ORDER[i] for i in p.jitter_order] if p.jitter else [],
                        "factors": dict(zip(_ORDER, (p.brightness, p.contrast, p.saturation, p.hue))) if p.jitter else {},
                        "grayscale": p.grayscale, "blur": p.blur, "sigma": p.sigma if p.blur else None,
                        "solarize": p.solarize})
    return out


def _features(crops: list[dict], kind: str) -> dict[str, np.ndarray]:
    cs = [c for c in crops if c["kind"] == kind]
    box = np.array([c["box"] for c in cs], dtype=float)
    jit = [c for c in cs if c["jitter"]]
    return {
        "area": box[:, 2] * box[:, 3] / (W * H),
        "log_aspect": np.log(box[:, 2] / box[:, 3]),
        "left": box[:, 0] / np.maximum(1, W - box[:, 2]),
        "top": box[:, 1] / np.maximum(1, H - box[:, 3]),
        **{f: np.array([c["factors"][f] for c in jit]) for f in _ORDER},
        "sigma": np.array([c["sigma"] for c in cs if c["blur"]]),
        "first_op": np.array([_ORDER.index(c["jitter"][0]) for c in jit]),
        "last_op": np.array([_ORDER.index(c["jitter"][-1]) for c in jit]),
        **{b: np.array([c[b] for c in cs], dtype=float) for b in ("flip", "grayscale", "blur", "solarize")},
        "jitter": np.array([bool(c["jitter"]) for c in cs], dtype=float),
    }


def _same(a: dict, b: dict, kind: str) -> None:
    for key in ("area", "log_aspect", "left", "top", *_ORDER, "sigma"):
        if len(a[key]) or len(b[key]):
            p = stats.ks_2samp(a[key], b[key]).pvalue
            assert p > P_MIN, (kind, key, p)
    for key in ("first_op", "last_op"):
        table = np.stack([np.bincount(a[key], minlength=4), np.bincount(b[key], minlength=4)])
        p = stats.chi2_contingency(table).pvalue
        assert p > P_MIN, (kind, key, p, table)
    for key in ("flip", "jitter", "grayscale", "blur", "solarize"):
        ka, kb = int(a[key].sum()), int(b[key].sum())
        na, nb = len(a[key]), len(b[key])
        if {ka, kb} <= {0} or (ka == na and kb == nb):
            continue  # both never / both always: identical
        p = stats.fisher_exact([[ka, na - ka], [kb, nb - kb]]).pvalue
        assert p > P_MIN, (kind, key, ka / na, kb / nb, p)


@pytest.fixture(scope="module")
def reference_crops():
    mp = pytest.MonkeyPatch()
    try:
        return _record_reference(mp, N_IMAGES)
    finally:
        mp.undo()  # the recorders must not outlive the recording


def test_draws_match_reference_transforms(reference_crops):
    g1, g2, loc = REFERENCE_BLUR_P
    ours = _ours(CropsConfig(blur_p_global1=g1, blur_p_global2=g2, blur_p_local=loc), N_IMAGES)
    for kind in KINDS:
        _same(_features(ours, kind), _features(reference_crops, kind), kind)
    # The reference code's blur rates really are 1 - p (0 / 0.9 / 0.5) ...
    ref = {k: _features(reference_crops, k)["blur"].mean() for k in KINDS}
    assert ref["global1"] == 0.0 and abs(ref["global2"] - 0.9) < 0.03 and abs(ref["local"] - 0.5) < 0.02
    # ... while the default config applies the intended ones.
    default = _ours(CropsConfig(), N_IMAGES, seed=1)
    for kind, p in zip(KINDS, INTENDED_BLUR_P):
        blur = _features(default, kind)["blur"]
        assert stats.binomtest(int(blur.sum()), len(blur), p).pvalue > P_MIN or p in (0.0, 1.0)
        if p in (0.0, 1.0):
            assert blur.mean() == p


def test_distribution_check_has_power(reference_crops):
    """A small change of one distribution is caught (the equality test above can fail)."""
    ref = _features(reference_crops, "local")
    wrong_scale = _features(_ours(CropsConfig(local_crops_scale=[0.07, 0.32]), N_IMAGES), "local")
    assert stats.ks_2samp(wrong_scale["area"], ref["area"]).pvalue < P_MIN
    wrong_flip = _features(_ours(CropsConfig(flip_p=0.45), N_IMAGES), "local")
    with pytest.raises(AssertionError):
        _same(wrong_flip, ref, "local")


@pytest.fixture(scope="module")
def photo_crops() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    out = []
    for a in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()):
        img = Image.fromarray(a)
        for size in (224, 98):
            x, y = int(rng.integers(0, img.width - 250)), int(rng.integers(0, img.height - 250))
            out.append(img.resize((size, size), Image.BICUBIC, box=(x, y, x + 250, y + 250)))
    return out


def _arr(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def test_fast_kernels_match_reference_pixels(photo_crops):
    rng = np.random.default_rng(0)
    errs = []
    for img in photo_crops:
        for _ in range(6):
            order = rng.permutation(4)
            b, c, s = rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2)
            h = rng.uniform(-0.1, 0.1)
            ref = img
            for op in order:
                ref = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op](
                    ref, (b, c, s, h)[op])
            ours = colour.color_jitter(np.asarray(img), order, b, c, s, h)
            errs.append(np.abs(_arr(ref) - ours.astype(np.int16)).mean())
    assert np.mean(errs) < 0.8 and max(errs) < 2.0, (np.mean(errs), max(errs))
    # Brightness then contrast is bit-exact (composed lookup table = PIL's blend arithmetic).
    img = photo_crops[0]
    a = np.asarray(img)
    ref = TF.adjust_contrast(TF.adjust_brightness(img, 1.3), 0.7)
    assert np.array_equal(_arr(ref), colour.color_jitter(a, [0, 1], 1.3, 0.7, 1.0, 0.0).astype(np.int16))
    for sigma in (0.1, 0.7, 1.3, 2.0):  # blur: the reference's own 9-tap kernel and padding
        ref = _arr(TF.gaussian_blur(img, 9, [sigma, sigma]))
        ours = colour.gaussian_blur(a, sigma).astype(np.int16)
        assert np.abs(ref - ours).max() <= 1 and np.abs(ref - ours).mean() < 0.01, sigma
    assert np.array_equal(_arr(TF.solarize(img, 128)), colour.solarize(a, 128))
    grey = np.asarray(TF.rgb_to_grayscale(img, 1), dtype=np.int16)
    assert np.abs(grey - colour.grayscale(a)).max() <= 1


def _crop_batch(aug: DataAugmentationDINO, n: int, photometric: bool) -> list[dict]:
    imgs = [Image.fromarray(a) for a in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())]
    return [aug.crops_uint8(imgs[i % 3], np.random.default_rng([5, i]), photometric) for i in range(n)]


def test_device_path_on_cpu_tensors_matches_cpu_path():
    aug = DataAugmentationDINO(global_crops_size=112, local_crops_size=56, local_crops_number=4)
    n = 12
    cpu_samples = _crop_batch(aug, n, photometric=True)
    dev_samples = _crop_batch(aug, n, photometric=False)
    mg = MaskingGenerator((8, 8), max_num_patches=32)
    norm = (aug.cfg.mean, aug.cfg.std)
    a = collate_data_and_cast(cpu_samples, (0.1, 0.5), 0.5, torch.float32, 64, mg, np.random.default_rng(0), norm)
    b = collate_data_and_cast(dev_samples, (0.1, 0.5), 0.5, torch.float32, 64, mg, np.random.default_rng(0), norm)
    assert b["collated_global_crops"].dtype == torch.uint8 and "collated_global_crops_params" in b
    # Once-per-batch normalisation = per-crop normalisation; crop-major order (crop c of sample i at c*n+i).
    assert torch.equal(a["collated_global_crops"][n + 3], aug.normalize(cpu_samples[3]["global_crops"][1]))
    assert torch.equal(a["collated_local_crops"][2 * n + 5], aug.normalize(cpu_samples[5]["local_crops"][2]))
    b = augment_batch(b, "cpu", *norm, torch.float32)
    std = torch.tensor(aug.cfg.std).view(1, 3, 1, 1)
    for key in ("collated_global_crops", "collated_local_crops"):
        x, y = a[key], b[key]
        assert x.shape == y.shape and y.dtype == torch.float32
        diff = ((x - y) * std * 255).abs()  # in uint8 levels
        per_crop = diff.mean((1, 2, 3))
        assert per_crop.mean() < 1.5 and per_crop.max() < 4.0, (key, per_crop.mean(), per_crop.max())
        # Same distribution of crop statistics over the batch (means and contrast of each crop).
        for stat in (lambda t: t.mean((1, 2, 3)), lambda t: t.std((1, 2, 3))):
            assert stats.ks_2samp(stat(x).numpy(), stat(y).numpy(), method="asymp").pvalue > 0.5
    assert torch.equal(a["collated_masks"], b["collated_masks"])


def test_device_path_ops_are_the_reference_tensor_kernels():
    rng = np.random.default_rng(1)
    img = Image.fromarray(skimage.data.astronaut()).resize((64, 64))
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    aug = DataAugmentationDINO(global_crops_size=64, local_crops_size=32)
    params = aug.sample_params(rng, 64, 64)[:2]
    for p in params:
        p.flip, p.jitter, p.grayscale, p.solarize, p.jitter_order = True, True, False, False, (3, 2, 1, 0)
        p.blur, p.sigma = True, 1.5
    out = apply_photometric(torch.stack([x, x]), pack_params(params), (0, 0, 0), (1, 1, 1))
    p = params[0]
    ref = TF.hflip(x.float() / 255)
    hue = int(p.hue * 255) / 256  # the reference's 8-bit HSV step, as the CPU path applies it
    for fn, f in ((TF.adjust_hue, hue), (TF.adjust_saturation, p.saturation), (TF.adjust_contrast, p.contrast),
                  (TF.adjust_brightness, p.brightness)):
        ref = fn(ref, f)
    ref = TF.gaussian_blur(ref, [9, 9], [1.5, 1.5])
    assert (out[0] - ref).abs().max() < 1e-4
    with pytest.raises(ValueError, match="uint8"):
        apply_photometric(torch.stack([x, x]).float(), pack_params(params), (0, 0, 0), (1, 1, 1))
