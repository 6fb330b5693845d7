"""Reading embedded images again by id (calibration's originals, verification's candidates).

The embed stage records where every ok image's bytes live (``input_path`` plus the byte range of a
tar member, or the whole file); this module turns ids back into decoded images.  An image that can
no longer be read (moved input, edited file) is ``None``: callers skip it and count it.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from curation import layout
from dinov2.data.shards import read_range

_COLUMNS = ["id", "status", "input_path", "byte_offset", "byte_size"]


def locations(out_dir: str | Path, source_prefix: str) -> pd.DataFrame:
    """Where the ok images of the sources starting with ``source_prefix`` live, indexed by id."""
    parts = []
    for source in layout.sources(Path(out_dir), source_prefix):
        for _, f in layout.embed_shards(Path(out_dir), source):
            try:
                parts.append(pq.read_table(f, columns=_COLUMNS).to_pandas())
            except Exception:  # noqa: BLE001 - a bad shard is reported by the store already
                continue
    if not parts:
        return pd.DataFrame(columns=_COLUMNS).set_index("id")
    df = pd.concat(parts, ignore_index=True)
    return df[df["status"] == "ok"].drop_duplicates("id").set_index("id")


class ImageReader:
    """``reader(id) -> PIL image | None`` over the images of some sources of an output folder."""

    def __init__(self, out_dir: str | Path, source_prefix: str, max_pixels: int):
        self.locs = locations(out_dir, source_prefix)
        self.max_pixels = max_pixels

    def __call__(self, image_id: str):
        from dinov2.data.decode import DecodeError, decode_image

        if image_id not in self.locs.index:
            return None
        row = self.locs.loc[image_id]
        off, size = row["byte_offset"], row["byte_size"]
        try:
            data = read_range(row["input_path"], int(off) if pd.notna(off) else -1, int(size) if pd.notna(size) else -1)
            return decode_image(data, max_pixels=self.max_pixels).image
        except (OSError, DecodeError, ValueError):  # moved input or odd member
            return None

    def load_many(self, ids: list[str]) -> list[tuple[str, object]]:
        """``(id, image)`` of the ids that can still be read, in order."""
        out = []
        for i in ids:
            im = self(i)
            if im is not None:
                out.append((i, im))
        return out
