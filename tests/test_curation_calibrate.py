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
    """Copies planted; the background: non-copies (an extreme-value law) plus 15 % real copies."""
    rng = np.random.default_rng(0)
    copies = {f: _cos_from_z(rng.normal(2.3 + 0.1 * i, 0.25, 60)) for i, f in enumerate(FAMILIES)}
    n_bg, share = 4000, 0.15
    n_copy = int(n_bg * share)
    non = _cos_from_z(rng.gumbel(1.2, 0.12, n_bg - n_copy))
    # the crawl's own copies: made like the planted ones (the estimator's assumption), families mixed
    fam_of = rng.integers(0, len(FAMILIES), n_copy)
    real = _cos_from_z(rng.normal(2.3 + 0.1 * fam_of, 0.25))
    background = np.concatenate([non, real])
    rec = fit_threshold(copies, background, target_precision=0.95)
    t = rec["threshold"]
    # the truth of this synthetic pool: precision and recall of "best match >= t"
    tp, fp = (real >= t).sum(), (non >= t).sum()
    assert tp / (tp + fp) >= 0.95 - 0.02  # an estimate: within two points of the target
    assert tp / n_copy >= 0.8
    assert rec["estimated_precision"] >= 0.95
    assert abs(rec["estimated_copy_share"] - share) < 0.03  # real duplicates are not counted as non-copies
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
    from curation.embedders import EmbedderConfig, load_embedder

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


def _config(tmp_path, **kw):
    from curation.config import CurationConfig
    from curation.embedders import EmbedderConfig

    cfg = CurationConfig(output_dir=str(tmp_path / "out"), inputs=[str(tmp_path / "pool")],
                         embedders={"lite0": EmbedderConfig(kind="efficientnet_lite0", image_size=96,
                                                            device="cpu", batch_size=32, **kw)})
    cfg.calibrate = CalibrateConfig(n_copies=27, n_background=100, seed=0)
    cfg.validate()
    return cfg


def test_calibrated_dedup_meets_target_on_tiny_planted_set(tmp_path, sign_digits):
    """Real photos + planted copies (other ops than calibration's): the calibrated threshold's drops are right."""
    from PIL import ImageOps

    from curation.calibrate import calibrate_stage, read_calibration
    from curation.dedup import run_dedup
    from curation.embed import embed_stage

    files = sorted(sign_digits.rglob("*.JPG"))[::20][:90]  # distinct hand photos, every class
    pool = tmp_path / "pool"
    pool.mkdir()
    truth = {}
    for n, f in enumerate(files):
        img = Image.open(f).convert("RGB")
        (pool / f"{f.stem}.jpg").write_bytes(_jpeg(img))
        truth[f.stem] = f.stem
        if n % 6 == 0:  # planted copies: mirrored, or brightened
            copy = ImageOps.mirror(img) if n % 12 == 0 else img.point(lambda v: min(255, int(v * 1.15)))
            (pool / f"{f.stem}-copy.jpg").write_bytes(_jpeg(copy))
            truth[f"{f.stem}-copy"] = f.stem
    cfg = _config(tmp_path, descriptor="flip")
    embed_stage("pool", cfg.inputs, cfg.embedders, cfg.output_dir, progress=False)
    t = calibrate_stage(cfg, "dedup")
    rec = read_calibration(cfg.output_dir)["dedup"]
    assert rec["source"] == "calibrated" and 0.0 < t < 1.0 and rec["threshold"] == t
    assert set(rec["estimated_recall_per_family"]) == set(FAMILIES)
    assert calibrate_stage(cfg, "dedup") == t  # cached, not recomputed
    import dataclasses

    import pandas as pd

    run_dedup(cfg.output_dir, dataclasses.replace(cfg.dedup, threshold=t, phash=False, exact=False))
    dd = pd.read_parquet(tmp_path / "out" / "dedup" / "decisions.parquet")
    stem = lambda i: i.rsplit("/", 1)[-1]
    dropped = dd[~dd["kept"]]
    right = [truth[stem(a)] == truth[stem(b)] for a, b in zip(dropped["id"], dropped["representative_id"])]
    assert len(dropped) >= 4 and np.mean(right) >= rec["target_precision"] - 0.02  # an estimate: ±2 points
    # an explicit threshold wins and is recorded as such
    cfg.dedup.threshold = 0.9
    assert calibrate_stage(cfg, "dedup") == 0.9
    assert read_calibration(cfg.output_dir)["dedup"]["source"] == "config"


def test_demo_truth_counts_overlapping_crops_as_same_content():
    from curation.truth import overlap, same_content

    a = {"group": 1, "photo": "p", "box": [0, 0, 100, 100]}
    b = {"group": 2, "photo": "p", "box": [20, 20, 90, 90]}  # inside a: the same part of the photo
    c = {"group": 3, "photo": "p", "box": [80, 80, 200, 200]}  # barely touches a
    d = {"group": 4, "photo": "q", "box": [0, 0, 100, 100]}
    assert overlap(a["box"], b["box"]) == 1.0 and overlap(a["box"], c["box"]) < 0.5
    assert same_content(a, b) and not same_content(a, c) and not same_content(a, d)
    assert same_content(a, dict(a, box=None))  # same planted group
    assert not same_content(a, None)


def test_synth_truth_records_boxes(tmp_path):
    from curation.synth import CrawlSpec, build_crawl

    rng = np.random.default_rng(0)
    photos = [(f"p{i}", Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))) for i in range(3)]
    truth = build_crawl(photos, tmp_path, CrawlSpec(n_base=12, n_heldout_per_photo=1, n_query_per_photo=1,
                                                    n_junk=2, min_out_side=32, max_out_side=48))
    items = [v for v in truth["items"].values() if v["kind"] != "junk"]
    assert items and all(len(v["box"]) == 4 for v in items)
    assert all(len(v["box"]) == 4 for v in truth["eval"].values())


def test_config_keys_for_calibration_and_descriptor():
    from curation.config import load_curation_config
    from dinov2.utils.config import ConfigError

    base = ["output_dir=/tmp/x", "inputs=[/tmp/x]", "embedders.e.kind=efficientnet_lite0"]
    cfg = load_curation_config(None, [*base, "calibrate.target_precision=0.99", "embedders.e.descriptor=flip"])
    assert cfg.calibrate.target_precision == 0.99 and cfg.dedup.threshold is None
    with pytest.raises(ConfigError, match="calibrate"):
        load_curation_config(None, [*base, "calibrate.bogus=1"])
    with pytest.raises(ConfigError, match="target_precision"):
        load_curation_config(None, [*base, "calibrate.target_precision=1.5"])


def test_bootstrap_embedder_bad_input_is_one_line_error(tmp_path, capsys):
    from curation.bootstrap import overrides
    from curation.cli import main

    rc = main(["bootstrap-embedder", "--inputs", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    ov = overrides(tmp_path / "run", ["/d/it's/{0..3}.tar"], steps=12, batch_size=4)
    assert "data.sources=[{pattern: '/d/it''s/{0..3}.tar'}]" in ov and "optim.max_steps=12" in ov


def test_sharded_dedup_runs_with_the_calibrated_threshold(tmp_path, sign_digits):
    """Threshold left null + sharding.mode=sharded: calibration runs as its own job before the
    arrays, and the sharded decisions equal the gathered stage's at the calibrated threshold."""
    import dataclasses

    from curation.calibrate import read_calibration
    from curation.dedup import run_dedup
    from curation.pipeline import prepare_output, run_stage

    pool = tmp_path / "pool"
    pool.mkdir()
    for n, f in enumerate(sorted(sign_digits.rglob("*.JPG"))[::40][:40]):
        img = Image.open(f).convert("RGB")
        (pool / f"{f.stem}.jpg").write_bytes(_jpeg(img))
        if n % 8 == 0:
            (pool / f"{f.stem}-copy.jpg").write_bytes(_jpeg(img.point(lambda v: min(255, int(v * 1.1)))))
    cfg = _config(tmp_path)
    cfg.executor.cluster = "debug"
    cfg.sharding.mode = "sharded"
    cfg.validate()
    assert cfg.dedup.threshold is None
    lock = prepare_output(cfg, ("embed", "dedup"))
    try:
        run_stage(cfg, "embed", progress=False)
        run_stage(cfg, "dedup", progress=False)
    finally:
        lock.release()
    out = tmp_path / "out"
    assert (out / "logs" / "dedup-calibrate").is_dir()  # calibration ran as a job of its own
    rec = read_calibration(out)["dedup"]
    assert rec["source"] == "calibrated" and 0.0 < rec["threshold"] < 1.0
    sharded = (out / "dedup" / "decisions.parquet").read_bytes()
    run_dedup(out, dataclasses.replace(cfg.dedup, threshold=rec["threshold"]), overwrite=True)
    assert (out / "dedup" / "decisions.parquet").read_bytes() == sharded
