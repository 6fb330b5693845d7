"""`curate run`: chain embed → dedup → decontaminate → retrieve → write (→ audit).

Each stage is submitted through :mod:`curation.jobs` (embed and the shard-writing
step as job arrays, the gather stages as single jobs) and the orchestrator waits for
it before starting the next one.  Re-running is always safe:

- finished work is skipped (embed shards and output shards by their files, gather
  stages by their output files + a stage record);
- a stage counts as finished only while every file it produced is still there; one that runs
  again marks every later stage stale;
- one ``curate`` at a time per output folder (``OUT/.lock``, see :mod:`dinov2.utils.lock`);
- every stage stores a fingerprint of the config values that determine its results
  (plus its upstream stages' fingerprints) in ``OUT/<stage>/_stage.json``; a rerun
  whose config would change a stage that has already run is refused, naming the
  changed keys, instead of silently mixing results.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dinov2.utils.config import ConfigError, flatten, to_dict, to_yaml
from dinov2.utils.io import atomic_write_json, atomic_write_text
from dinov2.utils.lock import FolderLock

from . import jobs
from .config import CurationConfig

log = logging.getLogger(__name__)

STAGES = ("embed", "dedup", "decontaminate", "retrieve", "write")
# Embedder fields that change speed, not results.
_NON_RESULT_EMBEDDER_KEYS = ("batch_size",)
_NON_RESULT_EMBED_KEYS = ("num_workers",)


class StageConfigMismatch(ConfigError):
    """The config would change the results of a stage that already ran in this output folder."""


# ----------------------------------------------------------------------------- sources
def sources(cfg: CurationConfig) -> dict[str, list[str]]:
    """``source name → input patterns``: the pool, every evaluation set and query set."""
    out = {"pool": list(cfg.inputs)}
    for name, patterns in sorted(cfg.eval_sets.items()):
        out[f"eval-{name}"] = list(patterns)
    for name, qs in sorted(cfg.query_sets.items()):
        out[f"query-{name}"] = list(qs.inputs)
    return out


# ----------------------------------------------------------------------------- fingerprints
def _fingerprint(cfg: CurationConfig, stage: str) -> dict[str, Any]:
    d = to_dict(cfg)
    if stage == "embed":
        embedders = {
            name: {k: v for k, v in e.items() if k not in _NON_RESULT_EMBEDDER_KEYS}
            for name, e in d["embedders"].items()
        }
        embed = {k: v for k, v in d["embed"].items() if k not in _NON_RESULT_EMBED_KEYS}
        from .ingest import expand_inputs

        # The expanded file lists, not just the patterns: a new shard matching a glob changes results.
        inputs = {src: expand_inputs(p) for src, p in sources(cfg).items()}
        return {"sources": inputs, "embedders": embedders, "embed": embed}
    if stage == "dedup":
        return {"dedup": d["dedup"], "calibrate": d["calibrate"]}
    if stage == "decontaminate":
        return {"decontaminate": d["decontaminate"], "eval_sets": sorted(cfg.eval_sets), "calibrate": d["calibrate"]}
    if stage == "retrieve":
        return {"retrieve": d["retrieve"], "query_sets": d["query_sets"], "seed": cfg.seed}
    if stage == "write":
        return {"write": d["write"], "seed": cfg.seed}
    raise ValueError(stage)


def stage_fingerprint(cfg: CurationConfig, stage: str) -> dict[str, Any]:
    """This stage's result-determining config + every upstream stage's (a chain)."""
    chain = {s: _fingerprint(cfg, s) for s in STAGES[: STAGES.index(stage) + 1]}
    return json.loads(json.dumps(chain, sort_keys=True, default=str))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_record_path(out_dir: str | Path, stage: str) -> Path:
    return Path(out_dir) / stage / "_stage.json"


def check_stage(cfg: CurationConfig, stage: str) -> dict | None:
    """Refuse (raise) if ``stage`` already ran here with a different result-determining config."""
    path = stage_record_path(cfg.output_dir, stage)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    fp = stage_fingerprint(cfg, stage)
    if record.get("hash") == _hash(fp):
        return record
    old, new = flatten(record.get("fingerprint", {})), flatten(fp)
    # Keys are "<stage>.<config key>"; show the config key the user would type.
    changed = sorted({k.split(".", 1)[-1] for k in set(old) | set(new) if old.get(k) != new.get(k)})
    shown = ", ".join(changed[:8]) + (" …" if len(changed) > 8 else "")
    later = STAGES[STAGES.index(stage):]
    folders = [str(Path(cfg.output_dir) / s) for s in later] + [str(Path(cfg.output_dir) / "final")]
    raise StageConfigMismatch(
        f"stage '{stage}' already ran in {cfg.output_dir} with a different configuration "
        f"(changed: {shown}). Its results would no longer match the config. Use a new output_dir, "
        f"or delete {', '.join(folders)} to recompute from '{stage}' on."
    )


def _mark_stage(cfg: CurationConfig, stage: str, complete: bool) -> None:
    fp = stage_fingerprint(cfg, stage)
    atomic_write_json(stage_record_path(cfg.output_dir, stage),
                      {"stage": stage, "hash": _hash(fp), "complete": complete, "fingerprint": fp})


def stage_complete(cfg: CurationConfig, stage: str) -> bool:
    """Recorded complete with this config *and* every file it produced still there."""
    record = check_stage(cfg, stage)
    if not (record and record.get("complete")):
        return False
    missing = missing_output(cfg, stage)
    if missing is not None:
        msg = (f"stage '{stage}' was complete, but its output {missing} is missing: recomputing what is "
               f"missing, then every later stage")
        log.warning("%s", msg)
        print(f"[curate] {msg}", flush=True)
        return False
    return True


def missing_output(cfg: CurationConfig, stage: str) -> Path | None:
    """The first file of a completed stage that is no longer there (None: all present)."""
    out = Path(cfg.output_dir)
    if stage == "embed":
        from .embed import shard_done, shard_id_for, shard_paths
        from .ingest import expand_inputs

        names = sorted(cfg.embedders)
        for source, patterns in sources(cfg).items():
            for i in range(len(expand_inputs(patterns))):
                if not shard_done(cfg.output_dir, source, shard_id_for(i), names):
                    parquet, npys = shard_paths(cfg.output_dir, source, shard_id_for(i), names)
                    return next((p for p in (parquet, *npys.values()) if not p.is_file()), parquet)
        return None
    if stage == "write":
        final = out / "final"
        for name in ("summary.json", "manifest.parquet"):
            if not (final / name).is_file():
                return final / name
        try:
            shards = json.loads((final / "summary.json").read_text()).get("shards", [])
        except (OSError, ValueError):
            return final / "summary.json"
        for shard in shards:
            path = final / str(shard.get("name", ""))
            if not path.is_file() or path.stat().st_size != int(shard.get("bytes", -1)):
                return path
        return None
    required = {"dedup": out / "dedup" / "decisions.parquet",
                "decontaminate": out / "decontaminate" / "decisions.parquet",
                "retrieve": out / "retrieve" / "selection.parquet"}[stage]
    return None if required.is_file() else required


def _invalidate_later_stages(cfg: CurationConfig, stage: str) -> None:
    """A stage that runs again makes every later stage's results stale, whatever their records say."""
    for later in STAGES[STAGES.index(stage) + 1:]:
        path = stage_record_path(cfg.output_dir, later)
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("complete"):
                atomic_write_json(path, {**record, "complete": False})


# ----------------------------------------------------------------------------- task bodies
# Module-level functions: submitit pickles them by reference into the worker processes.
def _setup_worker_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def task_embed(cfg: CurationConfig, source: str, patterns: list[str], task_index: int, num_tasks: int) -> dict:
    _setup_worker_logging()
    from .embed import embed_stage

    stats = embed_stage(
        source, patterns, dict(cfg.embedders), cfg.output_dir, task_index, num_tasks, cfg.embed.max_pixels,
        num_workers=cfg.embed.num_workers, max_bytes=cfg.embed.max_bytes, progress=False,
    )
    return {"source": source, "task": task_index, "shards": len(stats.shards)}


def task_dedup(cfg: CurationConfig) -> str:
    _setup_worker_logging()
    from .calibrate import resolved
    from .dedup import run_dedup

    # threshold (and verify.min_inliers): explicit or calibrated
    return str(run_dedup(cfg.output_dir, resolved(cfg, "dedup"), max_pixels=cfg.embed.max_pixels))


def task_decontaminate(cfg: CurationConfig) -> str:
    _setup_worker_logging()
    from .calibrate import resolved
    from .decontaminate import run_decontaminate

    return str(run_decontaminate(cfg.output_dir, resolved(cfg, "decontaminate"), max_pixels=cfg.embed.max_pixels))


def task_resolve_threshold(cfg: CurationConfig, stage: str) -> Any:
    """``cfg.<stage>`` with its threshold explicit or calibrated (a job: calibration embeds images)."""
    _setup_worker_logging()
    from .calibrate import resolved

    return resolved(cfg, stage)


def _resolved_in_job(cfg: CurationConfig, stage: str, progress: bool) -> Any:
    if getattr(cfg, stage).threshold is not None:
        from .calibrate import resolved

        return resolved(cfg, stage)  # no embedding: records the explicit threshold, as the gathered job does
    return jobs.run_tasks(cfg.executor, _logs(cfg, f"{stage}-calibrate"), f"{stage}-calibrate",
                          task_resolve_threshold, [(cfg, stage)], [f"calibrate {stage}"], gather=True,
                          progress=progress)[0]


def task_retrieve(cfg: CurationConfig) -> str:
    _setup_worker_logging()
    from .retrieve import run_retrieve

    return str(run_retrieve(cfg.output_dir, cfg.retrieve_config()))


def task_write_plan(cfg: CurationConfig) -> int:
    _setup_worker_logging()
    from .write import plan_write

    plan = plan_write(cfg.output_dir, cfg.write, seed=cfg.seed)
    return int(plan["output_shard"].notna().sum())


def task_write_shards(cfg: CurationConfig, task_index: int, num_tasks: int) -> int:
    _setup_worker_logging()
    from .write import write_shards

    return len(write_shards(cfg.output_dir, cfg.write, task_index, num_tasks, progress=False))


def task_write_finalize(cfg: CurationConfig) -> dict:
    _setup_worker_logging()
    from .write import finalize_write

    return finalize_write(cfg.output_dir, cfg.write)


# ----------------------------------------------------------------------------- stages
def _logs(cfg: CurationConfig, stage: str) -> Path:
    return Path(cfg.output_dir) / "logs" / stage


def _embed_calls(cfg: CurationConfig) -> tuple[list[tuple], list[str]]:
    from .embed import shard_done, shard_id_for
    from .ingest import expand_inputs

    calls, descs = [], []
    names = sorted(cfg.embedders)
    for source, patterns in sources(cfg).items():
        expanded = expand_inputs(patterns)  # a missing input fails here, before any job starts
        todo = [i for i in range(len(expanded)) if not shard_done(cfg.output_dir, source, shard_id_for(i), names)]
        if not todo:
            continue  # every shard of this source is done
        n_tasks = jobs.num_array_tasks(cfg.executor, len(expanded), cfg.executor.shards_per_task)
        for t in range(n_tasks):
            calls.append((cfg, source, patterns, t, n_tasks))
            descs.append(f"embed {source} task {t}/{n_tasks}")
    return calls, descs


def _sharded(cfg: CurationConfig, stage_cfg: Any) -> bool:
    from .dedup_sharded import use_sharded

    return use_sharded(cfg.output_dir, stage_cfg, cfg.sharding)


def _decontaminate_sharded(cfg: CurationConfig) -> bool:
    from .layout import EVAL_PREFIX, sources

    # without eval sets there is nothing to stream against: the gathered job writes the clean decisions
    return bool(sources(cfg.output_dir, EVAL_PREFIX)) and _sharded(cfg, cfg.decontaminate)


def _write_sharded(cfg: CurationConfig) -> bool:
    from .write_sharded import use_sharded

    return use_sharded(cfg.output_dir, cfg.sharding)


def run_stage(cfg: CurationConfig, stage: str, progress: bool = True) -> Any:
    """Run one stage (skipped when already complete with the same config)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    # Upstream stages must have run with this config (their fingerprints are in ours).
    for up in STAGES[: STAGES.index(stage)]:
        if not stage_complete(cfg, up):
            raise ConfigError(f"stage '{stage}' needs '{up}' to be complete in {cfg.output_dir}: run `curate {up}` first")
    if stage_complete(cfg, stage):
        log.info("stage %s: already complete, skipped", stage)
        print(f"[curate] {stage}: already complete (skipped)", flush=True)
        return None
    if stage in ("dedup", "decontaminate") and getattr(cfg, stage).verify.enabled and (
            _sharded(cfg, cfg.dedup) if stage == "dedup" else _decontaminate_sharded(cfg)):
        raise ConfigError(f"key '{stage}.verify.enabled': geometric verification runs in the gathered {stage} only, "
                          f"and this pool is sharded (sharding.mode={cfg.sharding.mode}); set "
                          f"sharding.mode=gathered or {stage}.verify.enabled=false")
    _mark_stage(cfg, stage, complete=False)
    _invalidate_later_stages(cfg, stage)
    print(f"[curate] {stage}: running on cluster={cfg.executor.cluster}", flush=True)
    t0 = time.time()
    ex = cfg.executor
    logs = _logs(cfg, stage)
    result: Any
    if stage == "embed":
        calls, descs = _embed_calls(cfg)
        result = jobs.run_tasks(ex, logs, "embed", task_embed, calls, descs, progress=progress)
    elif stage == "dedup" and _sharded(cfg, cfg.dedup):
        from .dedup_sharded import run_dedup_sharded

        print(f"[curate] dedup: sharded map → reduce (sharding.mode={cfg.sharding.mode})", flush=True)
        dedup_cfg = _resolved_in_job(cfg, "dedup", progress)
        result = run_dedup_sharded(cfg.output_dir, dedup_cfg, cfg.sharding, ex, progress=progress)
    elif stage == "decontaminate" and _decontaminate_sharded(cfg):
        from .decontaminate_sharded import run_decontaminate_sharded

        print(f"[curate] decontaminate: sharded match array (sharding.mode={cfg.sharding.mode})", flush=True)
        decon_cfg = _resolved_in_job(cfg, "decontaminate", progress)
        result = run_decontaminate_sharded(cfg.output_dir, decon_cfg, cfg.sharding, ex, progress=progress)
    elif stage == "retrieve" and _sharded(cfg, cfg.retrieve):
        from .retrieve_sharded import run_retrieve_sharded

        print(f"[curate] retrieve: sharded search / assign arrays (sharding.mode={cfg.sharding.mode})", flush=True)
        result = run_retrieve_sharded(cfg.output_dir, cfg.retrieve_config(), cfg.sharding, ex, progress=progress)
    elif stage in ("dedup", "decontaminate", "retrieve"):
        fn: Callable[..., Any] = {"dedup": task_dedup, "decontaminate": task_decontaminate,
                                  "retrieve": task_retrieve}[stage]
        result = jobs.run_tasks(ex, logs, stage, fn, [(cfg,)], [stage], gather=True, progress=progress)[0]
    elif stage == "write" and _write_sharded(cfg):
        from .write_sharded import run_write_sharded

        print(f"[curate] write: sharded plan → shards → manifest (sharding.mode={cfg.sharding.mode})", flush=True)
        result = run_write_sharded(cfg.output_dir, cfg.write, cfg.seed, cfg.sharding, ex, progress=progress)
    else:  # write: plan (gather) → shards (array) → finalize (gather)
        jobs.run_tasks(ex, logs, "write-plan", task_write_plan, [(cfg,)], ["write plan"], gather=True,
                       progress=progress)
        n = ex.write_tasks
        jobs.run_tasks(ex, logs, "write-shards", task_write_shards, [(cfg, t, n) for t in range(n)],
                       [f"write shards task {t}/{n}" for t in range(n)], progress=progress)
        result = jobs.run_tasks(ex, logs, "write-finalize", task_write_finalize, [(cfg,)], ["write finalize"],
                                gather=True, progress=progress)[0]
    _mark_stage(cfg, stage, complete=True)
    print(f"[curate] {stage}: done in {time.time() - t0:.1f} s", flush=True)
    return result


def prepare_output(cfg: CurationConfig, stages: tuple[str, ...] = STAGES) -> FolderLock:
    """Check inputs and every stage record against the config, lock the output folder, then save
    the resolved config.  Returns the held lock (the caller releases it when its stages are done).

    Nothing is created before the checks pass, and nothing is written unless the lock is held: a
    second run into the same folder is refused before it changes anything.
    """
    from .ingest import expand_inputs

    for patterns in sources(cfg).values():
        expand_inputs(patterns)  # a missing input is reported before anything is written
    for stage in stages:
        check_stage(cfg, stage)
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder")
    lock = FolderLock(out, "curate").acquire()
    try:
        for stage in stages:  # again: another run may have finished a stage meanwhile
            check_stage(cfg, stage)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    except BaseException:
        lock.release()
        raise
    return lock


def run_pipeline(cfg: CurationConfig, stages: tuple[str, ...] = STAGES, audit: bool = True,
                 progress: bool = True) -> dict:
    """Run ``stages`` in order; return the summary (funnel) and, if asked, the audit result."""
    with prepare_output(cfg):
        for stage in stages:
            run_stage(cfg, stage, progress=progress)
    summary = json.loads((Path(cfg.output_dir) / "final" / "summary.json").read_text())
    from .funnel import format_funnel

    print("[curate] funnel:\n" + format_funnel(summary["funnel"]), flush=True)
    if audit:
        from .audit import audit as run_audit

        report = run_audit(cfg.output_dir, inputs=list(cfg.inputs))
        print(report.text(), end="", flush=True)
        summary["audit_ok"] = report.ok
    return summary

