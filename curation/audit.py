"""Stage 6: audit a finished curation output folder.

Checks, each reported as PASS/FAIL with the first offending items:

- manifest: ids unique, decisions/stages valid, dropped rows carry a reason, kept rows
  have a unique (output shard, key);
- shards: the tar files in ``OUT/final`` are exactly those in ``summary.json``, each
  file's sha256 and sample count match it, every sample has one image + one json
  member, its image sha256 equals the manifest's, it decodes, its json names the
  manifest id, and every kept manifest row is found in its shard;
- inputs: re-listing the configured inputs gives exactly the manifest's ids (every
  input item accounted for exactly once);
- the summary's funnel equals the one recomputed from the manifest.

``audit(OUT)`` writes ``OUT/final/audit.txt`` and returns an :class:`AuditReport`;
``curate audit OUT`` exits non-zero when any check fails.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from dinov2.data.decode import DecodeError, decode_image
from dinov2.data.shards import RangeReader, group_samples, is_image_ext, list_tar
from dinov2.utils.io import atomic_write_text, sha256_file

from . import layout
from .funnel import STAGES, funnel_counts

MAX_LISTED = 20  # offending items listed per check


@dataclass
class Check:
    name: str
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def fail(self, msg: str) -> None:
        self.problems.append(msg)


@dataclass
class AuditReport:
    out_dir: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def text(self) -> str:
        lines = [f"audit of {self.out_dir}: {'PASS' if self.ok else 'FAIL'}"]
        for c in self.checks:
            status = "PASS" if c.ok else f"FAIL ({len(c.problems)} problem{'s' if len(c.problems) != 1 else ''})"
            extra = f" — {c.note}" if c.note else ""
            lines.append(f"[{status}] {c.name}: {c.checked} checked{extra}")
            for p in c.problems[:MAX_LISTED]:
                lines.append(f"    - {p}")
            if len(c.problems) > MAX_LISTED:
                lines.append(f"    … and {len(c.problems) - MAX_LISTED} more")
        return "\n".join(lines) + "\n"


def _check_manifest(manifest: pd.DataFrame) -> Check:
    c = Check("manifest rows", checked=len(manifest))
    dup = manifest["id"][manifest["id"].duplicated()]
    for rid in dup.unique()[:MAX_LISTED]:
        c.fail(f"id {rid!r} appears more than once")
    bad_dec = ~manifest["decision"].isin(["kept", "dropped"])
    for rid in manifest.loc[bad_dec, "id"][:MAX_LISTED]:
        c.fail(f"{rid}: invalid decision")
    bad_stage = ~manifest["stage"].isin(list(STAGES))
    for rid in manifest.loc[bad_stage, "id"][:MAX_LISTED]:
        c.fail(f"{rid}: invalid stage")
    dropped = manifest["decision"] == "dropped"
    for rid in manifest.loc[dropped & manifest["reason"].isna(), "id"][:MAX_LISTED]:
        c.fail(f"{rid}: dropped without a reason")
    kept = manifest[manifest["decision"] == "kept"]
    for rid in kept.loc[kept["output_shard"].isna() | kept["output_key"].isna(), "id"][:MAX_LISTED]:
        c.fail(f"{rid}: kept but has no output shard/key")
    pair = kept["output_shard"].astype(str) + "/" + kept["output_key"].astype(str)
    for p in pair[pair.duplicated()].unique()[:MAX_LISTED]:
        c.fail(f"output {p} is assigned to more than one image")
    return c


def _check_shards(final: Path, summary: dict, manifest: pd.DataFrame, decode: bool) -> Check:
    c = Check("shards")
    listed = {s["name"]: s for s in summary.get("shards", [])}
    on_disk = {p.name for p in final.glob("*.tar")}
    for name in sorted(on_disk - set(listed)):
        c.fail(f"{name}: on disk but not in summary.json")
    kept = manifest[manifest["decision"] == "kept"].set_index(["output_shard", "output_key"])
    kept = kept[~kept.index.duplicated()]  # duplicates are reported by the manifest check
    by_shard = manifest[manifest["decision"] == "kept"].groupby("output_shard").size().to_dict()
    for name in sorted(set(by_shard) - set(listed)):
        c.fail(f"{name}: the manifest assigns {by_shard[name]} images to it but summary.json lists no such shard")
    seen: set[tuple[str, str]] = set()
    for name in sorted(listed):
        entry = listed[name]
        path = final / name
        c.checked += 1
        if not path.is_file():
            c.fail(f"{name}: missing")
            continue
        sha = sha256_file(path)
        if sha != entry.get("sha256"):
            c.fail(f"{name}: sha256 {sha[:16]}… differs from summary.json {str(entry.get('sha256'))[:16]}…")
        try:
            listing = list_tar(path)
        except OSError as exc:
            c.fail(f"{name}: unreadable ({exc})")
            continue
        if listing.damage is not None:
            c.fail(f"{name}: damaged tar ({listing.damage.reason}: {listing.damage.detail})")
        names: set[str] = set()
        for m in listing.members:
            if m.kind != "file":
                c.fail(f"{name}: member {m.name!r} is not a regular file ({m.kind})")
            elif m.name in names:
                c.fail(f"{name}: member {m.name!r} appears more than once")
            names.add(m.name)
        samples = list(group_samples(listing.members))
        if len(samples) != entry.get("count"):
            c.fail(f"{name}: holds {len(samples)} samples, summary.json says {entry.get('count')}")
        if len(samples) != by_shard.get(name, 0):
            c.fail(f"{name}: holds {len(samples)} samples, the manifest assigns {by_shard.get(name, 0)}")
        reader = RangeReader(max_open=1)
        for sample in sorted(samples, key=lambda x: x.key):
            key, exts = sample.key, sample.members
            images = [e for e in exts if is_image_ext(e)]
            if len(images) != 1 or "json" not in exts or len(exts) != 2:
                c.fail(f"{name}:{key}: members {sorted(exts)} (want one image + json)")
                continue
            if (name, key) not in kept.index:
                c.fail(f"{name}:{key}: not in the manifest")
                continue
            seen.add((name, key))
            row = kept.loc[(name, key)]
            try:
                image, meta_member = exts[images[0]], exts["json"]
                data = reader.read(str(path), image.offset, image.size)
                meta_bytes = reader.read(str(path), meta_member.offset, meta_member.size)
            except OSError as exc:
                c.fail(f"{name}:{key}: unreadable member ({exc})")
                continue
            if hashlib.sha256(data).hexdigest() != row["sha256"]:
                c.fail(f"{name}:{key}: image sha256 differs from the manifest ({row['id']})")
            try:
                meta = json.loads(meta_bytes)
                if meta.get("id") != row["id"]:
                    c.fail(f"{name}:{key}: json id {meta.get('id')!r} != manifest id {row['id']!r}")
            except (ValueError, UnicodeDecodeError) as exc:
                c.fail(f"{name}:{key}: bad json ({exc})")
            if decode:
                try:
                    decode_image(data)
                except DecodeError as exc:
                    c.fail(f"{name}:{key}: does not decode ({exc})")
        reader.close()
    missing = [k for k in kept.index if k not in seen and k[0] in listed and (final / k[0]).is_file()]
    for shard, key in missing[:MAX_LISTED]:
        c.fail(f"{shard}:{key} ({kept.loc[(shard, key), 'id']}): kept in the manifest but absent from its shard")
    c.note = f"{sum(by_shard.values())} images in {len(listed)} shards"
    return c


def _check_inputs(manifest: pd.DataFrame, relisted: set[str] | None) -> Check:
    c = Check("inputs accounted for")
    if relisted is None:
        c.note = "skipped: no input listing available"
        return c
    c.checked = len(relisted)
    ids = set(manifest["id"])
    for rid in sorted(relisted - ids)[:MAX_LISTED]:
        c.fail(f"{rid}: input item missing from the manifest")
    extra = ids - relisted
    for rid in sorted(extra)[:MAX_LISTED]:
        c.fail(f"{rid}: in the manifest but not among the inputs")
    if len(relisted - ids) > MAX_LISTED or len(extra) > MAX_LISTED:
        c.note = f"{len(relisted - ids)} missing, {len(extra)} unexpected"
    return c


def _load_inputs_from_config(out_dir: Path) -> list[str] | None:
    path = layout.config_path(out_dir)
    if not path.is_file():
        return None
    import yaml

    cfg = yaml.safe_load(path.read_text()) or {}
    return list(cfg.get("inputs") or [])


def relist_input_ids(inputs: list[str]) -> set[str]:
    """Ids of every item in the pool inputs, listed afresh (no decoding)."""
    from .ingest import InputReader, expand_inputs

    ids: set[str] = set()
    # Shard ids follow the contract: s000000, s000001, … over the sorted, expanded input list.
    for i, path in enumerate(expand_inputs(inputs)):
        with InputReader(path) as reader:
            ids.update(f"{layout.POOL}/{layout.shard_id(i)}/{item.id_key}" for item in reader.items())
    return ids


def audit(
    out_dir: str | Path,
    inputs: list[str] | None = None,
    decode: bool = True,
    relist: Callable[[list[str]], set[str]] | None = None,
) -> AuditReport:
    """Audit ``out_dir``; write ``out_dir/final/audit.txt``; return the report."""
    out_dir = Path(out_dir)
    final = layout.final_dir(out_dir)
    checks: list[Check] = []
    head = Check("outputs present")
    summary, manifest = None, None
    try:
        summary = json.loads(layout.summary(out_dir).read_text())
    except FileNotFoundError:
        head.fail(f"{layout.summary(out_dir)} is missing (did the write stage finish?)")
    except ValueError as exc:
        head.fail(f"summary.json is not valid JSON: {exc}")
    try:
        manifest = pq.read_table(layout.manifest(out_dir)).to_pandas()
    except FileNotFoundError:
        head.fail(f"{layout.manifest(out_dir)} is missing (did the write stage finish?)")
    except Exception as exc:  # noqa: BLE001 - a damaged manifest is a finding, not a crash
        head.fail(f"manifest.parquet is unreadable: {exc}")
    checks.append(head)
    if summary is not None and manifest is not None:
        checks.append(_check_manifest(manifest))
        checks.append(_check_shards(final, summary, manifest, decode))
        if inputs is None:
            inputs = _load_inputs_from_config(out_dir)
        relisted = None
        if inputs:
            relisted = (relist or relist_input_ids)(inputs)
        checks.append(_check_inputs(manifest, relisted))
        fc = Check("funnel", checked=1)
        recomputed = funnel_counts(manifest)
        if summary.get("funnel") != recomputed:
            fc.fail(f"summary.json funnel {summary.get('funnel')} != manifest {recomputed}")
        checks.append(fc)
    report = AuditReport(str(out_dir), checks)
    if final.is_dir():
        atomic_write_text(layout.audit_report(out_dir), report.text())
    return report
