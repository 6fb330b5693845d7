"""Figures for the report: each function takes plain data and writes one PNG."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from dinov2.data.decode import DecodeError, decode_image
from dinov2.utils.io import atomic_path

PALETTE = ["#3b6ea8", "#e07b39", "#5a9e5a", "#c44e52", "#8172b2", "#937860", "#da8bc3", "#8c8c8c"]


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def thumbnail(data: bytes | None, size: int = 96) -> np.ndarray:
    """Decode image bytes to a square thumbnail; undecodable data gives a grey tile."""
    if data:
        try:
            img = decode_image(data).image
            img.thumbnail((size, size))
            tile = Image.new("RGB", (size, size), (245, 245, 245))
            tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
            return np.asarray(tile)
        except DecodeError:
            pass
    return np.full((size, size, 3), 200, dtype=np.uint8)


def funnel(counts: dict[str, int], path: Path) -> Path:
    names, values = list(counts), [int(v) for v in counts.values()]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(names) + 1))
    bars = ax.barh(range(len(names)), values, color=PALETTE[0])
    ax.set_yticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.invert_yaxis()
    top = max(values) if values else 1
    for bar, v in zip(bars, values):
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, f"{v:,}", va="center")
    ax.set_xlim(0, top * 1.15)
    ax.set_xlabel("images")
    ax.set_title("Curation funnel")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def image_rows(rows: Sequence[tuple[str, Sequence[tuple[bytes | None, str]]]], path: Path, title: str,
               thumb: int = 96) -> Path:
    """A grid: one row per (label, [(image bytes, caption)]) entry."""
    n_rows = max(1, len(rows))
    n_cols = max([len(r[1]) for r in rows] + [1])
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.35 * n_cols + 1.2, 1.55 * n_rows + 0.5), squeeze=False)
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(rows) and c < len(rows[r][1]):
                data, caption = rows[r][1][c]
                ax.imshow(thumbnail(data, thumb))
                ax.set_title(caption, fontsize=7)
        if r < len(rows):
            axes[r][0].text(-0.08, 0.5, rows[r][0], transform=axes[r][0].transAxes, ha="right", va="center",
                            fontsize=8, rotation=0)
    fig.suptitle(title)
    return _save(fig, path)


def cluster_sizes(before: Sequence[int], after: Sequence[int], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    order = np.argsort(before)[::-1]
    x = np.arange(len(order))
    ax.bar(x, np.asarray(before)[order], color=PALETTE[7], label="pool (before)")
    ax.bar(x, np.asarray(after)[order], color=PALETTE[1], label="curated (after)")
    ax.set_xlabel("cluster (sorted by pool size)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("images")
    ax.set_title("Cluster sizes before and after balancing")
    ax.legend()
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def training_curves(records: list[dict], path: Path, phase_starts: Sequence[int] = ()) -> Path:
    """Every loss term, lr and teacher entropy against the step."""
    if not records:
        raise ValueError("no training metrics to plot")
    steps = np.array([r.get("step", i) for i, r in enumerate(records)])
    loss_keys = sorted({k for r in records for k in r if k.endswith("loss") and isinstance(r[k], (int, float))})
    panels = [("losses", loss_keys), ("learning rate", [k for k in ("lr",) if k in records[0]]),
              ("teacher entropy", [k for k in records[0] if "entropy" in k])]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for i, key in enumerate(keys):
            vals = np.array([r.get(key, np.nan) for r in records], dtype=float)
            ax.plot(steps, vals, label=key, color=PALETTE[i % len(PALETTE)], lw=1.3)
        for s in phase_starts:
            ax.axvline(s, color="k", ls=":", lw=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.spines[["top", "right"]].set_visible(False)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    return _save(fig, path)


def accuracy_bars(results: dict[str, dict[str, float]], path: Path, title: str) -> Path:
    """results: {model name: {metric: accuracy in [0,1]}} as grouped bars."""
    models = list(results)
    metrics = sorted({m for r in results.values() for m in r}, key=lambda m: (len(m), m))
    width = 0.8 / max(1, len(models))
    fig, ax = plt.subplots(figsize=(1.3 * len(metrics) + 3, 3.4))
    for i, model in enumerate(models):
        vals = [100 * results[model].get(m, np.nan) for m in metrics]
        bars = ax.bar(np.arange(len(metrics)) + i * width, vals, width, label=model, color=PALETTE[i % len(PALETTE)])
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=7)
    ax.set_xticks(np.arange(len(metrics)) + width * (len(models) - 1) / 2, metrics)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def feature_maps(images: Sequence[np.ndarray], maps: Sequence[np.ndarray], path: Path, title: str,
                 cmap: str | None = None) -> Path:
    """Two rows: the input images and a per-image map (RGB PCA picture or a heat map)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.0 * n, 4.2), squeeze=False)
    for i in range(n):
        axes[0][i].imshow(images[i])
        axes[1][i].imshow(maps[i], cmap=cmap, interpolation="nearest")
        axes[0][i].axis("off")
        axes[1][i].axis("off")
    fig.suptitle(title)
    return _save(fig, path)
