"""Geometric verification of copy candidates (curation/verify.py) on real photos, and its stages."""
from __future__ import annotations

import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter, ImageOps

from curation.pair_verifier import FeatureCache, StoredPairVerifier, extract_many, verify_pairs
from curation.verify import VerifyConfig, candidate_pairs, extract, match

CFG = VerifyConfig(enabled=True)


def _jpeg(img, quality=85):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img, x0, y0, x1, y1):
    w, h = img.size
    return img.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h)))


def _paste(img, seed=0):
    rng = np.random.default_rng(seed)
    canvas = Image.fromarray(rng.integers(0, 256, (round(img.height * 1.25), round(img.width * 1.25), 3),
                                          dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    canvas.paste(img, (img.width // 10, img.height // 7))
    return canvas


@pytest.fixture(scope="module")
def photos(sign_digits):
    """Distinct hand photos of one class (the hardest non-copies: same wall, same pose) + other classes."""
    same = sorted((sign_digits / "3").glob("*.JPG"))[:12:3]
    other = [sorted((sign_digits / c).glob("*.JPG"))[5] for c in ("0", "5", "8")]
    return [Image.open(p).convert("RGB") for p in same + other]


def test_copies_share_many_inliers_distinct_photos_few(photos):
    original = photos[0]
    copies = {
        "crop 60 %": _crop(original, 0.1, 0.05, 0.85, 0.85),
        "mirror + crop + resize + jpeg": _jpeg(ImageOps.mirror(_crop(original, 0.0, 0.1, 0.8, 0.95)).resize((140, 150)), 40),
        "paste into a canvas": _paste(original),
        "text-free colour change": ImageOps.autocontrast(original, cutoff=5),
    }
    base = extract(original, CFG)
    copy_counts = {name: match(extract(c, CFG), base, CFG)[0] for name, c in copies.items()}
    distinct = [match(extract(p, CFG), base, CFG)[0] for p in photos[1:]]
    assert min(copy_counts.values()) >= 20, copy_counts
    assert max(distinct) <= 12, distinct
    assert min(copy_counts.values()) >= 2 * max(distinct)


def test_aligned_pixels_tell_a_copy_from_another_shot_of_one_scene(sign_digits):
    """Consecutive shots (same wall, same arm, the next digit) share many keypoints; only copies share pixels."""
    shot = Image.open(sign_digits / "4" / "IMG_4083.JPG").convert("RGB")
    next_shot = Image.open(sign_digits / "5" / "IMG_4084.JPG").convert("RGB")
    base = extract(shot, CFG)
    n_shot, corr_shot = match(extract(next_shot, CFG), base, CFG)
    assert n_shot >= 15, n_shot  # as many inliers as a copy: the count alone cannot tell
    copies = [_crop(shot, 0.1, 0.05, 0.85, 0.85), _paste(shot), ImageOps.autocontrast(shot, cutoff=5),
              _jpeg(ImageOps.mirror(_crop(shot, 0.0, 0.1, 0.8, 0.95)).resize((140, 150)), 40)]
    scores = [match(extract(c, CFG), base, CFG) for c in copies]
    assert all(n >= 15 and corr >= 0.93 for n, corr in scores), scores
    assert corr_shot <= 0.9, corr_shot


def test_correlation_tail_extends_past_the_chance_pairs_seen():
    from curation.calibrate_verify import correlation_tail

    rng = np.random.default_rng(0)
    chance = np.tanh(rng.normal(0.8, 0.2, 400))  # Fisher z normal: r around 0.66
    tail = correlation_tail(np.r_[chance, np.full(20, 0.99)])  # + a few real copies among them
    assert abs(tail(0.66) - 0.5) < 0.08 and abs(tail(float(np.tanh(1.2))) - 0.023) < 0.015
    assert 0 < tail(0.95) < tail(0.9) < 1e-3  # beyond every value seen, still not zero
    assert correlation_tail(chance[:5]) is None
    # candidates that agree a little more than the next ranks (and hold copies): the tail moves up
    candidates = np.r_[np.tanh(rng.normal(0.9, 0.2, 300)), np.full(100, 0.99)]
    shifted = correlation_tail(chance, candidates)
    assert shifted(0.9) > 2 * correlation_tail(chance)(0.9) and shifted(0.9) < 0.05


def _sampled_rows(rng, mean_inliers: float, corr_mean: float, corr_scale: float, n: int = 300):
    """Verified pairs of ``n`` sampled rows: 16 candidates (tier 0) and 16 next ranks (tier 1) each,
    chance inlier counts and correlations (row, tier, inliers, correlation)."""
    row = np.repeat(np.arange(n), 32)
    tier = np.tile(np.r_[np.zeros(16, int), np.ones(16, int)], n)
    inliers = rng.poisson(mean_inliers, len(row)).astype(np.int32)
    corr = np.tanh(rng.normal(corr_mean, corr_scale, len(row))).astype(np.float32)
    return row, tier, inliers, corr


def test_fit_verification_trades_inliers_for_agreeing_pixels():
    """Chance pairs with many inliers but pixels that disagree: the correlation check lets the count drop."""
    from curation.calibrate_verify import BackgroundPairs, fit_verification
    from curation.verify import PairScores

    rng = np.random.default_rng(0)
    n = 300
    row, tier, inliers, corr = _sampled_rows(rng, 6, 0.8, 0.25, n)  # rows 0..29 hold a copy
    scene = rng.random(len(row)) < 0.05  # other shots of one scene: as many inliers as a copy
    inliers[scene] += 20
    copy = (row < 30) & (np.arange(len(row)) % 32 == 0)
    inliers[copy], corr[copy] = 40 + rng.poisson(20, copy.sum()), 0.99
    bg = BackgroundPairs(row, tier, PairScores(inliers, corr, np.full(len(row), 200, np.int32)), n)
    fams = ("crop", "flip")
    found = {f: np.zeros(60, bool) for f in fams}
    counts = {f: 10 + rng.poisson(20, 60) for f in fams}
    corrs = {f: np.clip(rng.normal(0.985, 0.01, 60), 0, 1) for f in fams}
    fit = fit_verification(found, counts, corrs, bg, None, 0.95)
    assert fit["estimated_precision"] >= 0.95 and 0.85 <= fit["min_correlation"] <= 0.98, fit
    blind = fit_verification(found, counts, corrs, bg, None, 0.95, min_correlation=-1.0)  # no pixel check
    assert blind["min_inliers"] > fit["min_inliers"] and blind["estimated_recall"] < fit["estimated_recall"]
    explicit = fit_verification(found, counts, corrs, bg, None, 0.95, min_inliers=12, min_correlation=0.9)
    assert explicit["min_inliers"] == 12 and explicit["min_correlation"] == 0.9
    # copies the cosine links stay found unless verification refutes them (rich in keypoints, few inliers)
    from curation.calibrate_verify import NEVER_REFUTED

    linked = {f: np.ones(60, bool) for f in fams}
    few = dict(counts, crop=np.where(np.arange(60) < 6, 3, counts["crop"]))  # 6 crops share 3 inliers
    refutable = {"crop": np.where(np.arange(60) < 6, 3, NEVER_REFUTED), "flip": np.full(60, NEVER_REFUTED)}
    kept = fit_verification(linked, few, corrs, bg, None, 0.95, min_inliers=12, min_correlation=0.9)
    cut = fit_verification(linked, few, corrs, bg, None, 0.95, min_inliers=12, min_correlation=0.9,
                           cosine_inliers=refutable)
    assert kept["copies_refuted"] == 0 and kept["estimated_recall"] == 1.0
    assert cut["copies_refuted"] == 6 and cut["estimated_recall_per_family"] == {"crop": 0.9, "flip": 1.0}
    assert any("refute" in w for w in cut["warnings"])


def test_copies_among_the_candidates_bound_the_precision():
    """Other shots of one scene sit among the candidates (not among the next ranks the chance tail
    sees): counting the copies where only copies agree (correlation >= 0.95) exposes them."""
    from curation.calibrate_verify import (
        BackgroundPairs,
        copies_in_sample,
        copy_count_precision,
        fit_verification,
    )
    from curation.verify import PairScores

    rng = np.random.default_rng(0)
    n = 300
    row, tier, inliers, corr = _sampled_rows(rng, 5, 0.75, 0.15, n)
    first = np.arange(len(row)) % 32 == 0
    copy = first & (row < 30)  # 30 rows hold a copy: many inliers, pixels agree
    inliers[copy], corr[copy] = 20 + rng.poisson(20, copy.sum()), 0.99
    scene = first & (row >= 30) & (row < 60)  # 30 rows hold another shot of one scene, at candidate ranks only
    inliers[scene], corr[scene] = 12 + rng.poisson(3, scene.sum()), np.float32(0.88)
    bg = BackgroundPairs(row, tier, PairScores(inliers, corr, np.full(len(row), 200, np.int32)), n)
    left_inliers = (20 + rng.poisson(20, 100)).astype(np.int64)
    left_corr = np.clip(rng.normal(0.985, 0.01, 100), 0, 1)
    copies = copies_in_sample(left_inliers, left_corr, bg)
    loose = copy_count_precision(copies, left_inliers, left_corr, bg, 0.85)
    strict = copy_count_precision(copies, left_inliers, left_corr, bg, 0.93)
    assert 0.4 <= loose[10 - 8] <= 0.6, loose[10 - 8]  # half the linked rows are other shots
    assert strict[10 - 8] == 1.0
    found = {"crop": np.zeros(100, bool)}
    fit = fit_verification(found, {"crop": left_inliers}, {"crop": left_corr}, bg, None, 0.95)
    assert fit["min_correlation"] > 0.88 or fit["min_inliers"] > int(inliers[scene].max()), fit


def test_mirror_features_are_the_mirror_images_own(photos):
    """The descriptor permutation equals SIFT run on the mirror image at the mirrored keypoints."""
    import cv2

    from curation.verify import _MIRROR_BINS

    grey = cv2.resize(np.asarray(photos[0].convert("L")), (300, 300), interpolation=cv2.INTER_CUBIC)
    sift = cv2.SIFT_create(nfeatures=300)
    kps, desc = sift.detectAndCompute(grey, None)
    width = grey.shape[1]
    mirrored_kps = [cv2.KeyPoint(width - 1 - k.pt[0], k.pt[1], k.size, (180.0 - k.angle) % 360, k.response, k.octave)
                    for k in kps]
    _, on_mirror = sift.compute(np.ascontiguousarray(grey[:, ::-1]), mirrored_kps)
    err = np.abs(desc[:, _MIRROR_BINS] - on_mirror).mean() / desc.mean()
    unpermuted = np.abs(desc - on_mirror).mean() / desc.mean()
    assert err < 0.15 and unpermuted > 0.5, (err, unpermuted)
    # and as the verifier uses it: a mirror copy matches as well as the photo itself
    base = extract(photos[0], CFG)
    flipped = extract(ImageOps.mirror(photos[0]), CFG)
    assert match(flipped, base, CFG)[0] >= 0.5 * match(extract(photos[0], CFG), base, CFG)[0]


def test_counts_are_deterministic_and_cache_independent(photos):
    loads = []
    cache = FeatureCache(lambda i: loads.append(i) or photos[i], dataclasses.replace(CFG, cache_images=2))
    a, b = np.array([0, 1, 2, 0, 3]), np.array([4, 0, 1, 2, 0])
    first = verify_pairs(a, b, cache)
    again = verify_pairs(a[::-1].copy(), b[::-1].copy(), FeatureCache(lambda i: photos[i], CFG))
    assert first.inliers.tolist() == again.inliers[::-1].tolist()
    assert first.correlation.tolist() == again.correlation[::-1].tolist()
    # within one source a pair is one pair whichever side it comes from, and is scored once
    fresh = FeatureCache(lambda i: photos[i], CFG)
    forward = verify_pairs(np.array([3]), np.array([0]), fresh)
    n_scored = len(fresh.pair_scores)
    backward = verify_pairs(np.array([0]), np.array([3]), fresh)
    assert forward.inliers.tolist() == backward.inliers.tolist()
    assert forward.correlation.tolist() == backward.correlation.tolist() and len(fresh.pair_scores) == n_scored == 1
    assert cache.extracted == len(loads) and cache.unreadable == 0
    # an image that cannot be read again scores 0 and is counted
    broken = FeatureCache(lambda i: None if i == 1 else photos[i], CFG)
    out = verify_pairs(np.array([0, 1]), np.array([2, 0]), broken)
    assert out.inliers[1] == 0 and out.correlation[1] == 0 and broken.unreadable == 1


def test_extraction_threads_and_prefetch_change_nothing(photos):
    def load(i):
        return photos[i] if i < len(photos) else None  # the last key cannot be read again

    keys = list(range(len(photos) + 1))
    serial, threaded = extract_many(load, keys, CFG, workers=1), extract_many(load, keys, CFG, workers=3)
    assert [bad for _, bad in threaded] == [False] * len(photos) + [True] and threaded[-1][0] is None
    for (one, _), (other, _) in zip(serial[:-1], threaded[:-1]):
        for field in ("points", "descriptors", "thumb"):
            np.testing.assert_array_equal(getattr(one, field), getattr(other, field))
    # a cache that extracts each run of pairs' images together scores every pair as one that
    # extracts one image at a time (a 2-image cache never prefetches), each image once
    a, b = np.triu_indices(len(keys), 1)
    together = FeatureCache(load, CFG)
    one_by_one = FeatureCache(load, dataclasses.replace(CFG, cache_images=2))
    x, y = verify_pairs(a, b, together), verify_pairs(a, b, one_by_one)
    assert x.inliers.tolist() == y.inliers.tolist() and x.correlation.tolist() == y.correlation.tolist()
    assert x.keypoints.tolist() == y.keypoints.tolist()
    assert together.extracted == len(keys) and together.unreadable == 1 < one_by_one.extracted


def test_candidate_pairs_keep_only_undecided_neighbours():
    sims = np.array([[0.99, 0.8, 0.5, 0.1], [0.9, 0.7, 0.6, 0.4]], np.float32)
    nbrs = np.array([[1, 2, 3, -1], [0, 2, 3, 4]])
    cfg = VerifyConfig(enabled=True, candidates=3, min_similarity=0.55)
    a, b = candidate_pairs(np.array([0, 1]), sims, nbrs, threshold=0.95, cfg=cfg, self_search=True)
    # 0→1 clears the threshold (linked already), 0→3 is under min_similarity; 1→0 (cosine 0.9) is
    # the same unordered pair as 0→1 and is kept once
    assert sorted(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 2), (1, 3)]
    a, b = candidate_pairs(np.array([5]), sims[:1], nbrs[:1], threshold=0.95, cfg=cfg, self_search=False)
    assert list(zip(a.tolist(), b.tolist())) == [(5, 2)]


def test_verify_config_errors_name_the_key():
    from curation.dedup import DedupConfig
    from dinov2.utils.config import ConfigError

    with pytest.raises(ConfigError, match="dedup.verify.min_inliers"):
        DedupConfig(threshold=0.9, verify=VerifyConfig(enabled=True, min_inliers=2)).validate()
    with pytest.raises(ConfigError, match="dedup.verify.candidates"):
        DedupConfig(threshold=0.9, k=4, verify=VerifyConfig(enabled=True, candidates=8)).validate()
    with pytest.raises(ConfigError, match="ratio"):
        VerifyConfig(ratio=0.2).validate("decontaminate.verify")
    with pytest.raises(ConfigError, match="decontaminate.verify.refute_keypoints"):
        VerifyConfig(refute_keypoints=-1).validate("decontaminate.verify")


def test_sharded_stage_refuses_verification():
    from curation.config import CurationConfig
    from curation.embedders import EmbedderConfig
    from dinov2.utils.config import ConfigError

    cfg = CurationConfig(output_dir="/nonexistent/out", inputs=["/nonexistent/x.tar"],
                         embedders={"e": EmbedderConfig(kind="efficientnet_lite0")})
    cfg.dedup.verify.enabled = True
    cfg.sharding.mode = "sharded"
    with pytest.raises(ConfigError, match=r"dedup.verify.enabled.*gathered"):
        cfg.validate()


def test_dedup_core_links_a_crop_the_cosine_missed(photos):
    """Vectors put the crop at cosine 0.5 of its original (under the 0.9 threshold): only pixels link them."""
    from curation.dedup import DedupConfig, dedup_core

    images = [*photos, _crop(photos[0], 0.1, 0.05, 0.85, 0.85)]  # last row: a crop of row 0
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(images), 16)).astype(np.float32)
    vecs[-1] = 0.5 * vecs[0] / np.linalg.norm(vecs[0]) + 0.5 * vecs[-1] / np.linalg.norm(vecs[-1])
    vecs[1] = vecs[0] + 0.7 * rng.normal(size=16)  # a distinct photo as close as the crop
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    cache = FeatureCache(lambda r: images[r], CFG)
    cfg = DedupConfig(threshold=0.9, k=4, exact=False, phash=False,
                      verify=VerifyConfig(enabled=True, candidates=4, min_inliers=25, min_correlation=0.9))
    res = dedup_core(vecs, cfg, verify_fn=lambda a, b: verify_pairs(a, b, cache),
                     pixels=np.array([im.width * im.height for im in images]))
    last = len(images) - 1
    assert res.component[last] == res.component[0] and res.reason[last] == "near_duplicate"
    assert res.kept[0] and not res.kept[last]  # the larger image represents the pair
    assert res.component[1] != res.component[0], "a distinct photo of the same kind must stay apart"
    assert res.stats["verified_edges"] == 1 and res.stats["verify_pairs"] >= 3
    off = dedup_core(vecs, dataclasses.replace(cfg, verify=VerifyConfig()))
    assert off.component[last] != off.component[0]
    with pytest.raises(ValueError, match="min_inliers"):
        dedup_core(vecs, dataclasses.replace(cfg, verify=VerifyConfig(enabled=True, candidates=4)),
                   verify_fn=lambda a, b: verify_pairs(a, b, cache))


def test_geometry_refutes_a_cosine_link_between_different_photos(photos):
    """Vectors put a different photo of the same kind and a re-encoded copy both over the threshold:
    refutation unlinks the first (many keypoints, few shared), keeps the copy; decontamination too."""
    from curation.decontaminate import DecontamConfig, decontaminate_core
    from curation.dedup import DedupConfig, dedup_core

    images = [photos[0], photos[1], _jpeg(photos[0], 30), photos[4]]  # 0 and 1: two shots; 2: a copy of 0
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(len(images), 16)).astype(np.float32)
    vecs[1] = vecs[0] + 0.1 * rng.normal(size=16)
    vecs[2] = vecs[0] + 0.1 * rng.normal(size=16)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    assert min(float(vecs[0] @ vecs[1]), float(vecs[0] @ vecs[2])) > 0.95
    cache = FeatureCache(lambda r: images[r], CFG)
    assert min(len(cache.get(r).points) for r in (0, 1)) >= 40  # both rich enough to refute
    verify = VerifyConfig(enabled=True, candidates=3, min_inliers=15, min_correlation=0.9, refute_keypoints=40)
    cfg = DedupConfig(threshold=0.9, k=3, exact=False, phash=False, verify=verify)
    res = dedup_core(vecs, cfg, verify_fn=lambda a, b: verify_pairs(a, b, cache))
    assert res.component[2] == res.component[0], "a re-encoded copy stays linked"
    assert res.component[1] != res.component[0], "another shot of one scene is refuted"
    assert res.stats["refuted_edges"] >= 1
    trusting = dedup_core(vecs, dataclasses.replace(cfg, verify=dataclasses.replace(verify, refute_keypoints=0)),
                          verify_fn=lambda a, b: verify_pairs(a, b, cache))
    assert trusting.component[1] == trusting.component[0] and trusting.stats["refuted_edges"] == 0
    # a calibrated min_inliers in the hundreds (overlapping crops share much by chance) does not make
    # every cosine link refutable: under 8 inliers refutes, not under min_inliers
    strict = dedup_core(vecs, dataclasses.replace(cfg, verify=dataclasses.replace(verify, min_inliers=300)),
                        verify_fn=lambda a, b: verify_pairs(a, b, cache))
    assert strict.component[2] == strict.component[0] and strict.component[1] != strict.component[0]

    pool_images, eval_images = [photos[1], _jpeg(photos[0], 30), photos[5]], [photos[0]]
    pool_vecs, eval_vecs = vecs[[1, 2, 3]], vecs[[0]]
    pool_cache = FeatureCache(lambda r: pool_images[r], CFG)
    eval_cache = FeatureCache(lambda r: eval_images[r], CFG)
    dcfg = DecontamConfig(threshold=0.9, k=1, verify=verify)
    out = decontaminate_core(pool_vecs, eval_vecs, dcfg,
                             verify_fn=lambda a, b: verify_pairs(a, b, pool_cache, eval_cache))
    assert out.contaminated.tolist() == [False, True, False] and out.stats["refuted"] == 1


def test_fit_min_inliers_sits_above_chance():
    from curation.calibrate_verify import MIN_INLIERS_FLOOR, fit_min_inliers

    rng = np.random.default_rng(0)
    chance = rng.poisson(6, 300)  # chance matches of distinct photos
    copies = 60 + rng.poisson(40, 200)
    observed = np.concatenate([rng.poisson(7, 270), 30 + rng.poisson(50, 30)])  # 10 % copies in the crawl
    fams = {"crop": np.zeros(100, bool), "flip": np.ones(100, bool)}
    counts = {"crop": copies[:100], "flip": copies[100:]}
    fit = fit_min_inliers(fams, counts, observed, [(chance, True)], 0.95)
    assert chance.max() - 2 <= fit["min_inliers"] <= 30
    assert fit["estimated_precision"] >= 0.95 and fit["estimated_recall_per_family"]["crop"] == 1.0
    # chance pairs that share as many features as copies (crops of a few photos): said, not hidden
    fit = fit_min_inliers(fams, {f: np.full(100, 30) for f in fams}, observed, [(chance + 40, True)], 0.95)
    assert any("links little" in w for w in fit["warnings"]), fit
    # nothing but chance: the count stays above every chance match
    fit = fit_min_inliers(fams, counts, rng.poisson(6, 300), [(chance, True)], 0.95)
    assert fit["min_inliers"] >= max(MIN_INLIERS_FLOOR, np.quantile(chance, 0.99))


@pytest.mark.slow
def test_stage_calibrates_min_inliers_and_finds_crops_and_eval_copies(tmp_path, sign_digits):
    """Real photos end to end: embed, calibrate min_inliers, dedup and decontaminate."""
    import json

    from curation import layout
    from curation.calibrate import CalibrateConfig, read_calibration, resolved
    from curation.config import CurationConfig
    from curation.decontaminate import run_decontaminate
    from curation.dedup import run_dedup
    from curation.embed import embed_stage
    from curation.embedders import EmbedderConfig

    # every 30th photo by file name: consecutive shots are one person doing the next digit (same
    # arm, wall and light), which local features rightly see as largely the same pixels
    files = sorted(sign_digits.rglob("*.JPG"), key=lambda p: p.name)[::30][:80]
    pool, evals = tmp_path / "pool", tmp_path / "eval"
    pool.mkdir()
    evals.mkdir()
    truth = {}
    for n, f in enumerate(files):
        img = Image.open(f).convert("RGB")
        if n < 6:  # eval images; a crop of each of the first three is in the pool
            img.save(evals / f"{f.stem}.jpg", quality=92)
            if n < 3:
                _crop(img, 0.05, 0.1, 0.8, 0.9).save(pool / f"evalcopy-{f.stem}.jpg", quality=90)
            continue
        img.save(pool / f"{f.stem}.jpg", quality=92)
        truth[f.stem] = f.stem
        if n % 8 == 0:  # crops and mirrored crops of pool photos
            copy = _crop(img, 0.12, 0.0, 0.9, 0.82) if n % 16 == 0 else ImageOps.mirror(_crop(img, 0, 0.1, 0.85, 0.95))
            copy.save(pool / f"{f.stem}-copy.jpg", quality=88)
            truth[f"{f.stem}-copy"] = f.stem
    cfg = CurationConfig(output_dir=str(tmp_path / "out"), inputs=[str(pool)], eval_sets={"e": [str(evals)]},
                         embedders={"lite0": EmbedderConfig(kind="efficientnet_lite0", image_size=96, device="cpu",
                                                            batch_size=32, descriptor="flip")})
    cfg.calibrate = CalibrateConfig(n_copies=27, n_background=100, n_verify_background=60, seed=0)
    # an explicit, strict cosine threshold (it wins) leaves the near misses to verification, whose
    # min_inliers is still calibrated
    cfg.dedup.threshold = cfg.decontaminate.threshold = 0.99
    cfg.dedup.verify = VerifyConfig(enabled=True)
    cfg.decontaminate.verify = VerifyConfig(enabled=True)
    cfg.validate()
    embed_stage("pool", cfg.inputs, cfg.embedders, cfg.output_dir, progress=False)
    embed_stage("eval-e", cfg.eval_sets["e"], cfg.embedders, cfg.output_dir, progress=False)
    dedup_cfg = resolved(cfg, "dedup")
    full = read_calibration(cfg.output_dir)["dedup"]
    assert full["threshold"] == 0.99 and full["threshold_source"] == "config"
    rec = full["verify"]
    assert dedup_cfg.verify.min_inliers == rec["min_inliers"] >= 8
    assert {"estimated_precision", "estimated_recall_per_family", "chance_quantiles"} <= set(rec)
    run_dedup(cfg.output_dir, dedup_cfg)
    dd = pd.read_parquet(tmp_path / "out" / "dedup" / "decisions.parquet")
    stem = dd["id"].map(lambda i: i.rsplit("/", 1)[-1])
    group = stem.map(lambda s: truth.get(s, s))
    rep_group = group.set_axis(dd["id"]).reindex(dd["representative_id"]).to_numpy()
    dropped = ~dd["kept"].to_numpy()
    right = rep_group[dropped] == group.to_numpy()[dropped]
    assert right.mean() >= 0.9, dd[dropped][["id", "reason", "representative_id", "nn_sim"]].to_string()
    stats = json.loads(layout.stats_path(layout.dedup_decisions(cfg.output_dir)).read_text())
    assert stats["verified_edges"] >= 1 and stats["verify_min_inliers"] == dedup_cfg.verify.min_inliers
    assert stats["verify_min_correlation"] == dedup_cfg.verify.min_correlation == rec["min_correlation"] > 0.5
    # calibration and stage ran in this process: the stage re-used the features calibration extracted
    n_pool = len(dd)
    assert stats["verify_images_read"] < 0.5 * n_pool, stats
    again = StoredPairVerifier(cfg.output_dir, layout.POOL, dd["id"].to_numpy(), dedup_cfg.verify)
    assert again(np.array([0, 1]), np.array([1, 2])).inliers.shape == (2,) and again.images_read == 0
    n_scored = len(again.cache_a.pair_scores)
    again(np.array([1, 0]), np.array([2, 1]))
    assert len(again.cache_a.pair_scores) == n_scored  # scores are kept with the shared cache
    stricter = StoredPairVerifier(cfg.output_dir, layout.POOL, dd["id"].to_numpy(),
                                  dataclasses.replace(dedup_cfg.verify, ratio=0.7))
    assert stricter.cache_a is not again.cache_a  # other matching settings: other scores
    copies = stem.str.endswith("-copy")
    found = [dd.loc[dd["component"] == c, "id"].size > 1 for c in dd.loc[copies, "component"]]
    assert np.mean(found) >= 0.8, f"copies found: {found}"
    decon_cfg = resolved(cfg, "decontaminate")
    run_decontaminate(cfg.output_dir, decon_cfg)
    dc = pd.read_parquet(tmp_path / "out" / "decontaminate" / "decisions.parquet")
    is_copy = dc["id"].str.contains("evalcopy-")
    assert dc.loc[is_copy, "contaminated"].all(), dc.loc[is_copy]
    assert not dc.loc[~is_copy, "contaminated"].any(), dc.loc[dc["contaminated"] & ~is_copy]
