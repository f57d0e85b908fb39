"""The GPU-hour bill: what each job of a run took, and what another config's matrix would take on the same device.

Measured: every job's wall time from its Snakemake ``benchmark:`` TSV (``jobs.csv``, written by ``panobench
aggregate``). GPU-hours = wall seconds × devices / 3600 over the GPU jobs (train_vision, train_resampler,
train_finetune, generate); the one CPU score job is reported on its own.

Projected (:func:`project_matrix`): every job of a target config's matrix is matched to the measured jobs of the
same kind, and scaled by the target's own schedule:

- training (stage 1, 2, 3): matched by stage × resampler × number of views × batch size × devices; projected
  seconds = median measured micro-batch step time × configured optimizer steps × gradient accumulation. The step
  clock times every micro-batch (training/callbacks.py). Plus, once per job, the median time the matched jobs
  spent outside their timed steps (``bench_s − projected_train_s``: start-up, validation, checkpoint writes), as
  measured: it is not scaled with the target's validation schedule.
- generation (one job per cell, every eval stage): matched by resampler × number of views; projected seconds =
  eval stages × (test samples × measured decoding seconds per sample + measured start-up per stage), where the
  start-up per stage = (job wall time − decoding seconds) / stages of the measured job.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from panobench.errors import ConfigError, InputError
from panobench.geometry.tiling import plan_tiles
from panobench.reporting.aggregate import (
    GPU_RULES,
    JOB_COLUMNS,
    TRAIN_STAGES,
    VISION_RECIPE_COLUMNS,
    jobs_path,
    jobs_table,
    read_table,
    vision_recipes_path,
)
from panobench.stages import EVAL_STAGE_NAMES, RECIPE_STAGE

HOUR = 3600.0
# Columns of results.csv the projection needs (vision_recipes.csv: the same minus the cell-only ones).
TRAIN_MATCH_COLUMNS = ("stage", "status", "resampler", "num_views", "batch_size", "devices", "step_time_median_s",
                       "bench_s", "projected_train_s")
GENERATE_COLUMNS = ("cell_id", "gen_bench_s", "gen_job_stages", "gen_job_samples", "gen_job_seconds", "decoding")
PROJECTION_COLUMNS = ("rule", "target", "resampler", "num_views", "batch_size", "devices", "units", "unit_s",
                      "startup_s", "projected_s", "gpu_s", "matched")


@dataclass
class Projection:
    """The projected jobs of a target matrix (:data:`PROJECTION_COLUMNS`), what could not be projected, and notes.

    ``units`` × ``unit_s`` (+ ``startup_s``) = ``projected_s``: micro-batches × step time for training; eval stages
    × test samples × seconds per sample for generation. ``gpu_s`` = ``projected_s`` × devices.
    """

    config: str
    jobs: pd.DataFrame
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return float(self.jobs["gpu_s"].sum()) / HOUR

    def by_rule(self) -> pd.DataFrame:
        """Per rule, in pipeline order: jobs, median units (micro-batches; samples) and seconds per unit, the median
        job's seconds and the GPU-hours."""
        order = {r: i for i, r in enumerate(GPU_RULES)}
        grouped = self.jobs.groupby("rule", sort=False).agg(jobs=("target", "size"),
                                                           units_per_job=("units", "median"),
                                                           unit_s=("unit_s", "median"),
                                                           startup_s=("startup_s", "median"),
                                                           median_job_s=("projected_s", "median"),
                                                           gpu_hours=("gpu_s", lambda s: s.sum() / HOUR))
        return grouped.sort_index(key=lambda idx: idx.map(order)).reset_index()


def load_workflow_config(path: str | os.PathLike) -> dict[str, Any]:
    """A workflow config YAML (``config/*.yaml``) as a dict; InputError naming the file when unusable."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"workflow config {path} does not exist")
    try:
        wf = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise InputError(f"workflow config {path} is not valid YAML: {err}") from err
    if not isinstance(wf, dict) or not isinstance(wf.get("matrix"), dict) or "name" not in wf:
        raise InputError(f"workflow config {path} has no 'name' and 'matrix' (is it a panobench workflow config?)")
    wf.setdefault("run", {})
    return wf


def _num_views(resolved: dict[str, Any]) -> int:
    geometry = resolved["geometry"]
    plan = plan_tiles(geometry["overlap"], geometry["fov"], geometry.get("pitch_rows", (0.0,)))
    return plan.num_views(bool(geometry.get("include_global", True)))


def target_jobs(wf: dict[str, Any]) -> list[dict[str, Any]]:
    """Every GPU job of ``wf``'s matrix with what decides its cost (from each experiment's resolved config)."""
    from panobench import matrix as pm  # the matrix is the workflow's own definition of cells and recipes

    try:
        experiments = pm.experiments(wf)
        cells = pm.expand_cells(wf)
        recipes = pm.vision_recipes(wf)
    except (KeyError, TypeError) as err:
        raise ConfigError(f"workflow config {wf.get('name')!r} is incomplete: {err!r}") from err
    eval_stages = list(wf.get("eval_stages", EVAL_STAGE_NAMES))
    jobs = []
    for experiment, resampler, stages in ([(r.recipe_id, str(r.resampler), (RECIPE_STAGE,)) for r in recipes]
                                          + [(c.cell_id, c.resampler, TRAIN_STAGES) for c in cells]):
        resolved = experiments[experiment]
        for stage in stages:
            sched = resolved["stages"][stage]
            jobs.append({"rule": f"train_{stage}", "stage": stage, "target": experiment, "resampler": resampler,
                         "num_views": _num_views(resolved), "batch_size": int(sched["batch_size"]),
                         "devices": int(resolved["runtime"].get("devices", 1)), "steps": int(sched["max_steps"]),
                         "accumulate": int(sched.get("accumulate_grad_batches", 1))})
        if stages == TRAIN_STAGES and eval_stages:
            jobs.append({"rule": "generate", "stage": "generate", "target": experiment, "resampler": resampler,
                         "num_views": _num_views(resolved), "batch_size": int(resolved["eval"]["batch_size"]),
                         "devices": 1, "eval_stages": len(eval_stages),
                         "max_new_tokens": int(resolved["eval"]["max_new_tokens"])})
    return jobs


def _measured_training(results: pd.DataFrame, recipes: pd.DataFrame | None) -> pd.DataFrame:
    """Completed training rows (cells and recipes) with a step time, as stage/resampler/views/batch/devices/step.

    A step time exists only when the stage's measurements.json (written last, on completion) was read, so a row that
    is "failed" only because its evaluation is missing (a speed session that skipped generation) still counts.
    """
    frames = [results[list(TRAIN_MATCH_COLUMNS)]]
    if recipes is not None and not recipes.empty:
        frames.append(recipes.assign(stage=RECIPE_STAGE)[list(TRAIN_MATCH_COLUMNS)])
    rows = pd.concat(frames, ignore_index=True)
    rows = rows[rows["step_time_median_s"].notna() & rows["batch_size"].notna()]
    return rows.assign(devices=rows["devices"].fillna(1))   # records before `devices` was recorded ran on one


def _measured_generation(results: pd.DataFrame) -> pd.DataFrame:
    cells = results[["resampler", "num_views", *GENERATE_COLUMNS]].dropna(subset=["num_views"])
    cells = cells.drop_duplicates("cell_id")        # cell-level columns, repeated on each stage row: one row each
    cells = cells[cells["gen_job_seconds"].notna() & (cells["gen_job_samples"] > 0)]
    return cells.assign(per_sample=cells["gen_job_seconds"] / cells["gen_job_samples"],
                        startup_per_stage=(cells["gen_bench_s"] - cells["gen_job_seconds"]) / cells["gen_job_stages"],
                        samples_per_stage=cells["gen_job_samples"] / cells["gen_job_stages"])


def _max_new_tokens(decoding: object) -> float:
    try:
        return float(json.loads(str(decoding)).get("max_new_tokens"))
    except (ValueError, TypeError, AttributeError):
        return math.nan


def project_matrix(results: pd.DataFrame, recipes: pd.DataFrame | None, wf: dict[str, Any], *,
                   test_samples: int | None = None, scale_batch: bool = False) -> Projection:
    """Project the GPU time of every job of ``wf``'s matrix from the measured jobs in ``results``/``recipes``.

    Args:
        results: a results.csv table (the measured run).
        recipes: its vision_recipes.csv (stage-1 step times), or None.
        wf: the target workflow config (:func:`load_workflow_config`).
        test_samples: test samples per eval stage of the target; None = as many as the measured run generated.
        scale_batch: match training across batch sizes, scaling the step time linearly with the batch (an
            estimate: small batches are launch-bound, so this under-estimates small-batch targets).
    """
    if test_samples is not None and test_samples < 1:
        raise InputError(f"--test-samples must be >= 1, got {test_samples}")
    train = _measured_training(results, recipes)
    gen = _measured_generation(results)
    rows, missing, notes = [], [], []
    targets = target_jobs(wf)
    for job in targets:
        base = {"rule": job["rule"], "target": job["target"], "resampler": job["resampler"],
                "num_views": job["num_views"], "batch_size": job["batch_size"], "devices": job["devices"]}
        if job["rule"] == "generate":
            match = gen[(gen["resampler"] == job["resampler"]) & (gen["num_views"] == job["num_views"])]
            if match.empty:
                missing.append(f"generate: no measured generate job with resampler {job['resampler']}, "
                               f"{job['num_views']} views")
                continue
            samples = float(test_samples) if test_samples is not None else float(match["samples_per_stage"].median())
            startup = match["startup_per_stage"].dropna()
            startup_s = job["eval_stages"] * float(startup.median()) if not startup.empty else 0.0
            unit_s = float(match["per_sample"].median())
            units = job["eval_stages"] * samples
            rows.append({**base, "units": units, "unit_s": unit_s, "startup_s": startup_s,
                         "projected_s": units * unit_s + startup_s, "matched": len(match)})
            continue
        key = ((train["stage"] == job["stage"]) & (train["resampler"] == job["resampler"])
               & (train["num_views"] == job["num_views"]) & (train["devices"] == job["devices"]))
        match = train[key] if scale_batch else train[key & (train["batch_size"] == job["batch_size"])]
        if match.empty:
            have = sorted({(r.resampler, int(r.num_views), int(r.batch_size)) for r in train[
                train["stage"] == job["stage"]].itertuples()})
            missing.append(f"{job['rule']}: no measured {job['stage']} step with resampler {job['resampler']}, "
                           f"{job['num_views']} views, batch {job['batch_size']}, {job['devices']} device(s); "
                           f"measured (resampler, views, batch): {have or 'none'}")
            continue
        step = match["step_time_median_s"] * (job["batch_size"] / match["batch_size"] if scale_batch else 1.0)
        units = job["steps"] * job["accumulate"]
        unit_s = float(step.median())
        # What the measured jobs spent outside their timed steps (start-up, validation, checkpoints): added once per
        # job as measured, not scaled with the target's schedule.
        overhead = (match["bench_s"] - match["projected_train_s"]).clip(lower=0).dropna()
        startup_s = float(overhead.median()) if not overhead.empty else 0.0
        rows.append({**base, "units": units, "unit_s": unit_s, "startup_s": startup_s,
                     "projected_s": units * unit_s + startup_s, "matched": len(match)})
    jobs = pd.DataFrame(rows, columns=list(PROJECTION_COLUMNS))
    jobs["gpu_s"] = jobs["projected_s"] * jobs["devices"]
    if test_samples is None and (jobs["rule"] == "generate").any():
        notes.append("generation projected at the measured run's samples per eval stage (give --test-samples N for "
                     "the target's test set)")
    if scale_batch:
        notes.append("--scale-batch: step times scaled linearly with batch size (under-estimates launch-bound small "
                     "batches)")
    measured_tokens = {t for t in gen["decoding"].map(_max_new_tokens) if not math.isnan(t)}
    target_tokens = {j["max_new_tokens"] for j in targets if j["rule"] == "generate"}
    if measured_tokens and target_tokens and measured_tokens != target_tokens:
        notes.append(f"decoding max_new_tokens differs (measured {sorted(measured_tokens)}, target "
                     f"{sorted(target_tokens)}): generation time per sample scales with the tokens generated")
    # One line per kind of unmatched job (a 48-cell matrix would otherwise repeat each one per seed and checkpoint).
    counted = [f"{n} job(s) {line}" for line, n in pd.Series(missing, dtype=object).value_counts(sort=False).items()]
    return Projection(config=str(wf.get("name")), jobs=jobs, missing=counted, notes=notes)


def read_measured(results_csv: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame | None, pd.DataFrame]:
    """(results, vision recipes or None, jobs) of a run; jobs from jobs.csv beside it, else rebuilt (no score job)."""
    results = read_table(results_csv, ("cell_id", *TRAIN_MATCH_COLUMNS, *GENERATE_COLUMNS, "bench_max_rss_mb",
                                       "gen_bench_max_rss_mb"))
    recipes_csv = vision_recipes_path(results_csv)
    recipes = None
    if recipes_csv.is_file():
        recipes = read_table(recipes_csv, ("recipe_id", *[c for c in TRAIN_MATCH_COLUMNS if c != "stage"],
                                           "bench_max_rss_mb"),
                             what="vision recipe table")
        recipes = recipes.reindex(columns=list(VISION_RECIPE_COLUMNS))
    jobs_csv = jobs_path(results_csv)
    if jobs_csv.is_file():
        jobs = read_table(jobs_csv, JOB_COLUMNS, what="job table")
    else:
        jobs = jobs_table(results, recipes)
    return results, recipes, jobs


def measured_by_rule(jobs: pd.DataFrame) -> pd.DataFrame:
    """Per rule: jobs, jobs with a benchmark, measured wall hours, GPU-hours and projected training hours."""
    out = []
    for rule, group in jobs.groupby("rule", sort=False):
        wall = pd.to_numeric(group["bench_s"], errors="coerce")
        devices = pd.to_numeric(group["devices"], errors="coerce").fillna(1)
        gpu = bool(group["gpu"].astype(str).str.lower().eq("true").any())
        out.append({"rule": rule, "gpu": gpu, "jobs": len(group), "measured": int(wall.notna().sum()),
                    "wall_hours": wall.sum() / HOUR, "gpu_hours": (wall * devices).sum() / HOUR if gpu else 0.0,
                    "projected_train_hours": pd.to_numeric(group["projected_s"], errors="coerce").sum() / HOUR})
    return pd.DataFrame(out, columns=["rule", "gpu", "jobs", "measured", "wall_hours", "gpu_hours",
                                      "projected_train_hours"])
