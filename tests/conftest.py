"""Shared fixtures and helpers of the test suite (real photos, tars, curation outputs)."""
import io
import os
from pathlib import Path

import pytest

# Two cores here; keep torch from oversubscribing when tests spawn processes.
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO = Path(__file__).resolve().parents[1]
SIGN_DIGITS = REPO.parent / "shared" / "data" / "sign-digits"


@pytest.fixture(scope="session")
def sign_digits() -> Path:
    if not SIGN_DIGITS.is_dir():
        pytest.skip(f"real photos not found at {SIGN_DIGITS} (team data folder ../shared/data/sign-digits)")
    return SIGN_DIGITS


# ----------------------------------------------------------------------------- photos and shards
def skimage_photo(name: str, size: tuple[int, int] | None = None):
    """A real photo shipped with scikit-image (``astronaut``, ``coffee``, …) as RGB, optionally resized."""
    import skimage.data
    from PIL import Image

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    return img.resize(size, Image.Resampling.BICUBIC) if size else img


def encode(img, fmt: str = "JPEG", **kw) -> bytes:
    """``img`` encoded as ``fmt`` (JPEG at quality 90 unless told otherwise)."""
    if fmt == "JPEG":
        kw.setdefault("quality", 90)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_bytes(img, quality: int = 90) -> bytes:
    return encode(img, "JPEG", quality=quality)


def write_tar(path, members) -> None:
    """A tar of ``(name, bytes)`` members written with the standard library (default headers)."""
    import tarfile

    with tarfile.open(path, "w") as tf:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))


# ----------------------------------------------------------------------------- curation outputs
def write_embed_shard(out_dir, source: str, shard_id: str, records, embeddings: dict) -> Path:
    """Write one embed shard in the ARCHITECTURE layout (curation/embed.py is the real writer).

    ``records`` needs ``key`` (and may give any other column); rows with
    ``status == "ok"`` (default) get consecutive ``emb_row`` values and must match
    the rows of each ``embeddings[name]`` array ([n_ok, D], stored as float16).
    """
    import numpy as np
    import pandas as pd

    from curation import layout
    from curation.store import normalize_rows
    from dinov2.utils.io import atomic_save_npy, atomic_write_parquet

    df = records.copy().reset_index(drop=True)
    if "key" not in df.columns:
        raise ValueError("records need a 'key' column")
    n = len(df)
    defaults = {"source": source, "shard_id": shard_id, "input_path": "", "member": None, "ext": "jpg",
                "url": None, "caption": None, "sha256": None, "phash": None, "width": None, "height": None,
                "orig_mode": "RGB", "status": "ok", "reason": None, "detail": None, "byte_offset": 0,
                "byte_size": 0}
    for col, val in defaults.items():
        if col not in df.columns:
            df[col] = [val] * n
    df["status"] = df["status"].fillna("ok")
    df["id"] = [f"{source}/{shard_id}/{k}" for k in df["key"]]
    ok = (df["status"] == "ok").to_numpy()
    df["emb_row"] = np.where(ok, np.cumsum(ok) - 1, -1).astype(np.int64)
    df["phash"] = pd.array(df["phash"], dtype="Int64")
    for name, emb in embeddings.items():
        emb = np.asarray(emb)
        if emb.shape[0] != int(ok.sum()):
            raise ValueError(f"embeddings '{name}' have {emb.shape[0]} rows for {int(ok.sum())} ok records")
        emb = normalize_rows(emb).astype(np.float16)
        atomic_save_npy(layout.embed_npy(out_dir, source, shard_id, name), emb)
    cols = ["id", "source", "shard_id", "input_path", "member", "key", "ext", "url", "caption", "sha256",
            "phash", "width", "height", "orig_mode", "status", "reason", "detail", "emb_row", "byte_offset",
            "byte_size"]
    path = layout.embed_parquet(out_dir, source, shard_id)
    atomic_write_parquet(path, df[cols])
    return path


def write_all(out_dir, cfg, seed: int = 0, **plan_kw) -> dict:
    """The write stage's three steps in one process (the pipeline runs them as separate tasks)."""
    from curation.write import finalize_write, plan_write, write_shards

    plan_write(out_dir, cfg, seed=seed, **plan_kw)
    write_shards(out_dir, cfg, progress=False)
    return finalize_write(out_dir, cfg)


def clustered_pool(out, n_shards: int = 6, rows: int = 300, dim: int = 32, seed: int = 0, emb: str = "e") -> None:
    """Clustered vectors with planted near-duplicates, exact copies (sha256) and close phashes."""
    import numpy as np
    import pandas as pd

    from curation import layout

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim)).astype(np.float32)
    for s in range(n_shards):
        x = centres[rng.integers(0, 12, rows)] + 0.8 * rng.standard_normal((rows, dim)).astype(np.float32)
        src = rng.choice(rows // 2, rows // 10, replace=False)
        x[rows // 2 : rows // 2 + len(src)] = x[src] + 0.03 * rng.standard_normal((len(src), dim)).astype(np.float32)
        x[-3:] = x[0]  # identical rows: every one of their k neighbours clears the threshold (re-query)
        sha = [f"{s}-{i}" for i in range(rows)]
        sha[7] = sha[8] = f"copy-{s % 2}"  # exact copies, also across shards
        recs = pd.DataFrame({"key": [f"k{i:04d}" for i in range(rows)], "sha256": sha,
                             "phash": rng.integers(-2**62, 2**62, rows), "width": rng.integers(50, 90, rows),
                             "height": 64})
        write_embed_shard(out, "pool", layout.shard_id(s), recs, {emb: x})


def sigkill_when(argv: list[str], ready, timeout_s: float = 120.0, settle_s: float = 0.0) -> int:
    """Run ``python *argv`` from the repository root in its own process group, SIGKILL the whole group
    as soon as ``ready()`` is true, and return its exit status (``-SIGKILL`` when it was killed).
    ``settle_s``: wait that long after a kill (tasks started as their own processes may still finish
    their atomic writes)."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, *argv], cwd=Path(__file__).resolve().parents[1],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout_s:
        if ready():
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    rc = proc.wait()
    if rc == -signal.SIGKILL:
        time.sleep(settle_s)
    return rc


@pytest.fixture(autouse=True)
def _restore_thread_limits():
    """Tasks run in-process (the debug executor) set BLAS / OpenMP / torch thread counts that stay set
    (curation.dedup_sharded.setup_task); restore them so a later test runs with the counts it was
    measured with (the learning tests' margins depend on the arithmetic, hence on the thread count)."""
    import sys

    from threadpoolctl import threadpool_limits

    saved = threadpool_limits(limits=None)  # records the current limits, changes nothing
    torch_threads = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    faiss_threads = sys.modules["faiss"].omp_get_max_threads() if "faiss" in sys.modules else None
    yield
    saved.restore_original_limits()
    if torch_threads is not None and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(torch_threads)
    if faiss_threads is not None and "faiss" in sys.modules:
        sys.modules["faiss"].omp_set_num_threads(faiss_threads)
