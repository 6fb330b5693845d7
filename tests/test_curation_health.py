"""Warnings for outputs that ran to the end but not as meant (empty eval/query sets, retrieval
that kept everything or nothing)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.health import output_warnings


def _embed(out: Path, source: str, statuses: list[str]) -> None:
    folder = out / "embed" / source
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"status": statuses}), folder / "s000000.parquet")


def _funnel(candidates: int, kept: int) -> dict[str, int]:
    return {"inputs": candidates, "decoded": candidates, "after_dedup": candidates,
            "after_decontamination": candidates, "retrieved": kept, "written": kept}


def test_empty_eval_and_query_sets_are_reported(tmp_path):
    _embed(tmp_path, "pool", ["ok"] * 10)
    _embed(tmp_path, "eval-holdout", ["error", "error"])
    _embed(tmp_path, "query-birds", ["error"])
    w = output_warnings(tmp_path, _funnel(10, 3))
    assert any("eval set 'holdout' has no usable image" in x for x in w)
    assert any("query set 'birds' has no usable image" in x for x in w)


def test_retrieval_keeping_all_or_nothing_is_reported(tmp_path):
    _embed(tmp_path, "pool", ["ok"] * 100)
    _embed(tmp_path, "query-q", ["ok"] * 5)
    assert output_warnings(tmp_path, _funnel(100, 40)) == []
    assert any("kept 97 of 100" in x for x in output_warnings(tmp_path, _funnel(100, 97)))
    w = output_warnings(tmp_path, _funnel(100, 0))
    assert any("selected nothing" in x for x in w) and any("no image was written" in x for x in w)


def test_no_query_sets_means_no_retrieval_warning(tmp_path):
    _embed(tmp_path, "pool", ["ok"] * 10)
    assert output_warnings(tmp_path, _funnel(10, 10)) == []
