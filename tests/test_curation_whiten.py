"""Pool-fitted copy-detection whitening (curation/whiten.py): fit, regularisation, stages, reuse."""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import write_embed_shard

from curation import layout
from curation.store import normalize_rows
from curation.whiten import Whitener, WhiteningConfig, fit_pca, pool_whitener

D = 64


def _population(seed: int = 0):
    """Photos-of-one-kind-like vectors: a large shared mean, four strong axes, a weak isotropic rest
    (raw cosines of distinct vectors ~0.9, as Lite0 on the hand photos)."""
    rng = np.random.default_rng(seed)
    mean = np.zeros(D)
    mean[0] = 6.0
    scales = np.r_[np.full(4, 1.0), np.full(D - 4, 0.15)]
    basis = np.linalg.qr(rng.standard_normal((D, D)))[0]
    return lambda n: mean + (rng.standard_normal((n, D)) * scales) @ basis.T


def _pair_cosines(z: np.ndarray) -> np.ndarray:
    z = normalize_rows(z).astype(np.float64)
    return (z @ z.T)[np.triu_indices(len(z), 1)]


def _reference_whiten(fit_x: np.ndarray, dim: int, shrinkage: float):
    """The same whitening written independently with numpy's own np.cov, in float64."""
    xn = fit_x / np.linalg.norm(fit_x, axis=1, keepdims=True)
    mu = xn.mean(0)
    lam, vec = np.linalg.eigh(np.cov(xn, rowvar=False))
    lam, vec = lam[::-1][:dim], vec[:, ::-1][:, :dim]
    scale = (1 - shrinkage) * np.clip(lam, 0, None) + shrinkage * np.trace(np.cov(xn, rowvar=False)) / xn.shape[1]
    proj = vec / np.sqrt(scale)
    return lambda z: (z / np.linalg.norm(z, axis=1, keepdims=True) - mu) @ proj


def test_fit_is_deterministic_row_independent_and_matches_a_numpy_reference():
    draw = _population()
    fit_x, test = draw(300).astype(np.float32), draw(80).astype(np.float32)
    w = fit_pca(fit_x, 32, 0.25)
    assert w.to_bytes() == fit_pca(fit_x, 32, 0.25).to_bytes()  # a pure function of its inputs
    out = w(test)
    assert out.shape == (80, 32) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)
    # a row's output never depends on the rows that share its block (gathered vs sharded reads)
    one_by_one = np.concatenate([w(test[i : i + 1]) for i in range(len(test))])
    assert one_by_one.tobytes() == out.tobytes()
    assert w(test[::-1])[::-1].tobytes() == out.tobytes()
    ref = _reference_whiten(fit_x.astype(np.float64), 32, 0.25)
    np.testing.assert_allclose(_pair_cosines(out), _pair_cosines(ref(test.astype(np.float64))), atol=2e-5)
    # stored and loaded: the same vectors
    path_bytes = w.to_bytes()
    with np.load(io.BytesIO(path_bytes)) as z:
        again = Whitener(z["mean"], z["proj"], z["eigenvalues"])
    assert again(test).tobytes() == out.tobytes()
    assert np.all(w(np.zeros((2, D), np.float32)) == 0)  # zero rows stay zero


def test_small_sample_fit_does_not_blow_up_noise_directions():
    """Fitted on 100 vectors in 64 dimensions, the shrunk fit keeps distinct held-out vectors about as
    unrelated as the population's own whitening does; the unshrunk fit inflates their cosines."""
    draw = _population(1)
    fit_x, test = draw(100), draw(300)
    copies = test + 0.05 * np.random.default_rng(2).standard_normal(test.shape)
    big = draw(20000)
    big = big / np.linalg.norm(big, axis=1, keepdims=True)
    mu = big.mean(0)
    lam, vec = np.linalg.eigh(np.cov(big, rowvar=False))  # population reference, float64 numpy
    population = (test / np.linalg.norm(test, axis=1, keepdims=True) - mu) @ (vec / np.sqrt(lam))
    q99 = lambda z: float(np.quantile(_pair_cosines(z), 0.99))
    raw, ref = q99(test), q99(population)
    shrunk = fit_pca(fit_x.astype(np.float32), D, 0.25)
    plain = fit_pca(fit_x.astype(np.float32), D, 0.0)
    got, unshrunk = q99(shrunk(test.astype(np.float32))), q99(plain(test.astype(np.float32)))
    assert raw > 0.9  # raw cosines: every pair looks alike
    assert got <= ref + 0.1, (got, ref)
    assert unshrunk > got + 0.05, (unshrunk, got)
    cos = np.einsum("ij,ij->i", shrunk(test.astype(np.float32)), shrunk(copies.astype(np.float32)))
    assert np.median(cos) > 0.9 and np.mean(cos > got) > 0.95  # copies stay above the distinct q99
    # fewer samples than dimensions: only the sample's rank is used, and nothing is infinite
    tiny = fit_pca(fit_x[:20].astype(np.float32), D, 0.25)
    assert tiny.dim == 19 and np.all(np.isfinite(tiny.proj))


def test_whitening_config_is_validated_with_one_line_errors():
    from curation.config import load_curation_config
    from curation.decontaminate import DecontamConfig
    from curation.dedup import DedupConfig
    from dinov2.utils.config import ConfigError

    with pytest.raises(ConfigError, match=r"dedup\.whitening\.kind") as e:
        DedupConfig(whitening=WhiteningConfig(kind="zca")).validate()
    assert "\n" not in str(e.value) and "pca" in str(e.value)
    with pytest.raises(ConfigError, match=r"decontaminate\.whitening\.shrinkage"):
        DecontamConfig(whitening=WhiteningConfig(kind="pca", shrinkage=1.5)).validate()
    base = ["output_dir=/tmp/x", "inputs=[/tmp/x]", "embedders.e.kind=efficientnet_lite0"]
    cfg = load_curation_config(None, [*base, "dedup.whitening.kind=pca", "dedup.whitening.dim=128"])
    assert cfg.dedup.whitening.kind == "pca" and cfg.decontaminate.whitening.kind == "none"
    for bad in ("dedup.whitening.kind=zca", "dedup.whitening.bogus=1"):
        with pytest.raises(ConfigError) as e:
            load_curation_config(None, [*base, bad])
        assert "\n" not in str(e.value)


def _pool(out: Path, n_shards: int = 3, rows: int = 120) -> None:
    draw = _population(3)
    rng = np.random.default_rng(4)
    for s in range(n_shards):
        x = draw(rows)
        x[rows // 2 : rows // 2 + 10] = x[:10] + 0.01 * rng.standard_normal((10, D))  # near copies
        recs = pd.DataFrame({"key": [f"k{i:04d}" for i in range(rows)], "sha256": [f"{s}-{i}" for i in range(rows)],
                             "width": 64, "height": 64})
        write_embed_shard(out, "pool", layout.shard_id(s), recs, {"e": x.astype(np.float32)})


def test_dedup_rerun_reuses_the_stored_whitening(tmp_path, monkeypatch):
    from curation import whiten
    from curation.dedup import DedupConfig, run_dedup

    out = tmp_path / "out"
    _pool(out)
    wcfg = WhiteningConfig(kind="pca", dim=32, n_sample=300)
    cfg = DedupConfig(embedder="e", k=4, threshold=0.8, phash=False, whitening=wcfg)
    run_dedup(out, cfg)
    first = layout.dedup_decisions(out).read_bytes()
    stored = sorted((out / "whiten").glob("e-*.npz"))
    assert len(stored) == 1
    stats = json.loads(layout.stats_path(layout.dedup_decisions(out)).read_text())
    assert stats["whitening"] == stored[0].name
    d = pd.read_parquet(layout.dedup_decisions(out))
    assert (~d["kept"]).sum() >= 30  # the planted near copies are found in the whitened space

    def no_fit(*a, **k):
        raise AssertionError("the stored whitening must be reused, not refitted")

    monkeypatch.setattr(whiten, "fit_pca", no_fit)
    assert pool_whitener(out, "e", wcfg).path == stored[0]
    run_dedup(out, cfg, overwrite=True)
    assert layout.dedup_decisions(out).read_bytes() == first
    monkeypatch.undo()
    other = pool_whitener(out, "e", WhiteningConfig(kind="pca", dim=16, n_sample=300))
    assert other.dim == 16 and len(list((out / "whiten").glob("e-*.npz"))) == 2  # other settings: own fit
    assert pool_whitener(out, "e", WhiteningConfig()) is None


def test_calibration_compares_planted_copies_in_the_whitened_space(tmp_path, sign_digits):
    """Threshold null + whitening: calibration fits (or finds) the pool's whitening, records it, and its
    background and planted copies are cosines of whitened vectors (a new record, not the raw one)."""
    import torch
    from PIL import Image

    from curation.calibrate import CalibrateConfig, calibrate_stage, read_calibration
    from curation.config import CurationConfig
    from curation.embed import embed_stage
    from curation.embedders import EmbedderConfig

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 24, 3),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    torch.jit.script(net).save(str(tmp_path / "net.pt"))
    pool = tmp_path / "pool"
    pool.mkdir()
    for f in sorted(sign_digits.rglob("*.JPG"))[::30][:60]:
        Image.open(f).convert("RGB").save(pool / f"{f.stem}.jpg", quality=90)
    cfg = CurationConfig(output_dir=str(tmp_path / "out"), inputs=[str(pool)],
                         embedders={"t": EmbedderConfig(kind="torchscript", checkpoint=str(tmp_path / "net.pt"),
                                                        image_size=32, device="cpu")})
    cfg.calibrate = CalibrateConfig(n_copies=27, n_background=60, seed=0)
    cfg.validate()
    embed_stage("pool", cfg.inputs, cfg.embedders, cfg.output_dir, progress=False)
    calibrate_stage(cfg, "dedup")
    raw = read_calibration(cfg.output_dir)["dedup"]
    assert raw["whitening"] is None
    cfg.dedup.whitening = WhiteningConfig(kind="pca", dim=12)
    cfg.validate()
    calibrate_stage(cfg, "dedup")
    rec = read_calibration(cfg.output_dir)["dedup"]
    stored = pool_whitener(cfg.output_dir, "t", cfg.dedup.whitening)
    assert rec["source"] == "calibrated" and rec["whitening"] == stored.path.name
    # whitening removes what the photos share: distinct photos' best matches drop
    assert rec["background_quantiles"]["0.5"] < raw["background_quantiles"]["0.5"] - 0.05
    with np.load(layout.calibration(cfg.output_dir, "dedup").with_suffix(".npz")) as z:
        copies = np.concatenate([z[k] for k in z.files if k.startswith("copies_")])
    assert len(copies) == 27 and np.all(np.abs(copies) <= 1 + 1e-5)


@pytest.mark.parametrize("damage", ["truncated", "zip_junk", "not_numpy", "wrong_shapes"])
def test_a_damaged_stored_whitening_is_refitted_not_trusted(tmp_path, damage):
    """The artifact sits in a run folder a user may hand over: odd bytes never crash a stage or run
    code (no pickles); the stage refits and writes a good one, with the same result as before."""
    out = tmp_path / "out"
    _pool(out)
    wcfg = WhiteningConfig(kind="pca", dim=32, n_sample=300)
    good = pool_whitener(out, "e", wcfg)
    data = good.path.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "zip_junk": b"PK\x03\x04" + b"\x00" * 64, "not_numpy": b"hello",
           "wrong_shapes": Whitener(good.mean[:3], good.proj, good.eigenvalues, good.key).to_bytes()}[damage]
    good.path.write_bytes(bad)
    again = pool_whitener(out, "e", wcfg)
    assert np.array_equal(again.proj, good.proj) and np.array_equal(again.mean, good.mean)
    assert good.path.read_bytes() == data
