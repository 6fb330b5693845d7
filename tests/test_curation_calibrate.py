"""Self-calibrating thresholds, crop/flip-robust descriptors and retrieval's auto choice (issue 14)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from curation.calibrate import CalibrateConfig, fit_threshold
from curation.descriptors import DESCRIPTORS, wrap_forward
from curation.plant import FAMILIES, plant_copy
from curation.retrieval_plan import auto_method, auto_n_clusters, selection_warnings


def _cos_from_z(z):
    return np.tanh(z)


def test_fit_threshold_meets_target_on_planted_mixture():
    """Copies planted, non-copies from an extreme-value law, the background holding 15 % real copies."""
    rng = np.random.default_rng(0)
    copies = {f: _cos_from_z(rng.normal(2.3 + 0.1 * i, 0.25, 60)) for i, f in enumerate(FAMILIES)}
    n_bg, share = 4000, 0.15
    n_copy = int(n_bg * share)
    non = _cos_from_z(rng.gumbel(1.2, 0.12, n_bg - n_copy))
    real = _cos_from_z(rng.normal(2.4, 0.3, n_copy))
    background = np.concatenate([non, real])
    rec = fit_threshold(copies, background, target_precision=0.95)
    t = rec["threshold"]
    # the truth of this synthetic pool: precision and recall of "best match >= t"
    tp, fp = (real >= t).sum(), (non >= t).sum()
    assert tp / (tp + fp) >= 0.95
    assert tp / n_copy >= 0.8
    assert rec["estimated_precision"] >= 0.95
    assert abs(rec["estimated_copy_share"] - share) < 0.06  # real duplicates are not counted as non-copies
    assert set(rec["estimated_recall_per_family"]) == set(FAMILIES)


def test_fit_threshold_warns_when_nothing_separates():
    rng = np.random.default_rng(1)
    same = _cos_from_z(rng.normal(1.0, 0.2, 500))
    rec = fit_threshold({"crop": same[:60]}, same, target_precision=0.99)
    assert rec["warnings"], "a threshold that cannot reach the target must be reported"


def test_calibrate_config_rejects_bad_values():
    from dinov2.utils.config import ConfigError

    with pytest.raises(ConfigError, match="target_precision"):
        CalibrateConfig(target_precision=1.0).validate()
    with pytest.raises(ConfigError, match="n_copies"):
        CalibrateConfig(n_copies=2).validate()


@pytest.mark.parametrize("family", FAMILIES)
def test_plant_copy_every_family(family):
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))
    copy, ops = plant_copy(rng, img, family)
    assert copy.mode == "RGB" and min(copy.size) >= 8
    assert ops if family == "combo" else ops == family
    with pytest.raises(ValueError):
        plant_copy(rng, img, "paste-into-emoji")


def _tiny_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()


@pytest.mark.parametrize("descriptor", DESCRIPTORS)
def test_descriptor_wraps_any_forward(descriptor):
    net = _tiny_net()
    fwd = wrap_forward(net, descriptor)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = fwd(x)
        mirrored = fwd(torch.flip(x, dims=(3,)))
    assert out.shape == (3, 16)
    if descriptor != "global":  # flip-invariant by construction
        torch.testing.assert_close(torch.nn.functional.normalize(out, dim=1),
                                   torch.nn.functional.normalize(mirrored, dim=1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        wrap_forward(net, "sift")


def test_descriptor_option_for_torchscript_embedder(tmp_path):
    """Users who bring a TorchScript model (e.g. SSCD) get the option through the embedder config."""
    from curation.embed import EmbedderConfig, load_embedder

    path = tmp_path / "net.pt"
    torch.jit.script(_tiny_net()).save(str(path))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8))
    vecs = {}
    for desc in ("global", "flip", "regions"):
        emb = load_embedder(EmbedderConfig(kind="torchscript", checkpoint=str(path), image_size=32, descriptor=desc))
        batch = torch.stack([emb.preprocess(img), emb.preprocess(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))])
        v = emb.embed(batch)
        assert v.shape == (2, 16) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
        vecs[desc] = v
    assert float(vecs["flip"][0] @ vecs["flip"][1]) > 0.9999
    assert float(vecs["regions"][0] @ vecs["regions"][1]) > 0.9999
    from dinov2.utils.config import ConfigError

    with pytest.raises(ConfigError, match="descriptor"):
        EmbedderConfig(kind="efficientnet_lite0", descriptor="sift").validate()


def test_retrieval_auto_follows_pool_and_query_sizes():
    # the crawl: 641 candidates, 72 query images → sample-based (it was cluster-based)
    assert auto_method(641, 72)[0] == "sample"
    # the paper's regime: ~744M candidates, 1M-image sets sample-based, smaller ones cluster-based
    assert auto_method(744_000_000, 1_200_000)[0] == "sample"
    assert auto_method(744_000_000, 50_000)[0] == "cluster"
    assert auto_method(5_000_000, 1_000)[0] == "cluster"
    assert auto_method(5_000_000, 10_000)[0] == "sample"
    assert auto_method(100, 0)[0] == "sample"  # too few candidates for meaningful clusters
    # an explicit absolute rule still works
    assert auto_method(641, 72, sample_min_queries=1_000_000)[0] == "cluster"
    # clusters: the paper's 100k at its scale, sqrt(N) for small pools
    assert auto_n_clusters(744_000_000)[0] == 100_000
    assert auto_n_clusters(10_000)[0] == 100
    assert auto_n_clusters(1)[0] == 1


def test_retrieval_warnings_keep_all_or_nothing():
    assert "kept 96 %" in selection_warnings(641, 615, True)[0]
    assert "nothing" in selection_warnings(641, 0, True)[0]
    assert "only" in selection_warnings(100_000, 50, True)[0]
    assert selection_warnings(641, 200, True) == []
    assert selection_warnings(641, 641, False) == []  # no query sets: keeping all is the intent


def test_retrieve_core_records_choice_and_warns():
    from curation.retrieve import QuerySet, RetrieveConfig, retrieve_core

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 16))
    pool = np.concatenate([c + 0.05 * rng.normal(size=(100, 16)) for c in centers]).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    q = (centers[0] + 0.05 * rng.normal(size=(12, 16))).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    res = retrieve_core(pool, None, [QuerySet("a", q, np.array([f"q{i}" for i in range(12)], object))],
                        RetrieveConfig(sample_k=4))
    info = res.clusters["per_set"]["a"]
    assert info["method"] == "sample" and "sample-based" in info["why"]
    share = (np.flatnonzero(res.selected) < 100).mean()
    assert share > 0.9 and res.selected.sum() <= 48  # enriched: raw share is 1/6
    assert res.clusters["warnings"] == []


def _jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()
