"""Collect the records of every cell of a manifest into one tidy table (``results.csv``, docs/records.md).

One row per cell x training stage. A stage is ``ok`` when both its ``measurements.json`` and its eval
``metrics.json`` exist and are readable; otherwise it is ``failed`` and ``error`` carries the most informative
line of the job's log, so a failed cell stays visible in the report instead of silently disappearing.
The column list is fixed (:data:`RESULT_COLUMNS`): values that do not apply (GPU memory on CPU, SPICE without
its jars, a failed cell's metrics) are NaN, but the column is always there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from panobench.errors import InputError
from panobench.stages import EVAL_STAGES, PER_CELL_STAGES, STAGE_NAMES
from panobench.utils.io import atomic_path, read_json

logger = logging.getLogger(__name__)

TRAIN_STAGES = PER_CELL_STAGES   # one results row per cell x stage trained for it
METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
KNOB_COLUMNS = ("cell_id", "overlap", "fov", "resampler", "vision_checkpoint", "seed")
VERSION_PACKAGES = ("torch", "transformers", "peft", "lightning", "cuda", "mamba-ssm")

# (column, path inside measurements.json); one place defines both the order and the source of every column.
_MEASUREMENT_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("num_tiles", ("geometry", "num_tiles")),
    ("num_views", ("geometry", "num_views")),
    ("nominal_overlap", ("geometry", "nominal_overlap")),
    ("effective_overlap", ("geometry", "effective_overlap")),
    ("vision_tokens_per_view", ("tokens", "vision_tokens_per_view")),
    ("resampled_tokens_per_view", ("tokens", "resampled_tokens_per_view")),   # the LM's per-view budget
    ("visual_tokens_per_sample", ("tokens", "visual_tokens_per_sample")),
    ("text_tokens_per_sample", ("tokens", "text_tokens_per_sample")),
    ("measured_steps", ("speed", "measured_steps")),
    ("step_time_median_s", ("speed", "step_time_median_s")),
    ("step_time_p90_s", ("speed", "step_time_p90_s")),
    ("batch_size", ("speed", "batch_size")),
    ("devices", ("speed", "devices")),
    ("samples_per_s", ("speed", "samples_per_s")),
    ("tokens_per_s", ("speed", "tokens_per_s")),
    ("visual_tokens_per_s", ("speed", "visual_tokens_per_s")),
    ("text_tokens_per_s", ("speed", "text_tokens_per_s")),
    ("peak_gpu_allocated_gib", ("memory", "peak_gpu_allocated_gib")),
    ("peak_gpu_reserved_gib", ("memory", "peak_gpu_reserved_gib")),
    ("peak_host_rss_gib", ("memory", "peak_host_rss_gib")),
    ("flops_per_step", ("cost", "flops_per_step")),
    ("device_peak_flops", ("cost", "device_peak_flops")),
    ("mfu", ("cost", "mfu")),
    ("measured_peak_flops", ("cost", "measured_peak_flops")),
    ("mfu_measured_peak", ("cost", "mfu_measured_peak")),
    ("params_trainable", ("params", "trainable")),
    ("params_total", ("params", "total")),
    ("kernel_path", ("kernel_path",)),
    ("resampler_init", ("resampler_init",)),
    ("loss_first", ("loss", "first")),
    ("loss_last", ("loss", "last")),
    ("loss_best_val", ("loss", "best_val")),            # the validation loss best.ckpt was chosen by
    ("loss_best_val_step", ("loss", "best_val_step")),
    ("loss_last_val", ("loss", "last_val")),
    ("trainable_without_grad", ("gradient_check", "trainable_without_grad")),
    ("data_fingerprint", ("data", "fingerprint")),
    ("data_num_images", ("data", "num_images")),
)
_EVAL_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gen_tokens_per_s", ("generation", "tokens_per_s")),
    ("gen_latency_s_per_sample", ("generation", "latency_s_per_sample")),
    ("gen_prefill_s_per_sample", ("generation", "prefill_s_per_sample")),
    ("gen_decode_tokens_per_s", ("generation", "decode_tokens_per_s")),
    ("gen_end_to_end_tokens_per_s", ("generation", "end_to_end_tokens_per_s")),
    ("gen_checkpoint_step", ("generation", "checkpoint_step")),
    ("eval_data_fingerprint", ("generation", "data", "fingerprint")),
    ("num_groups", ("num_groups",)),
    ("empty_predictions", ("empty_predictions",)),
    ("mean_prediction_length_words", ("mean_prediction_length_words",)),
    ("SPICE_reason", ("SPICE_reason",)),
)
_PROVENANCE_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("device", ("env", "device")),
    ("device_type", ("env", "device_type")),
    ("config_hash", ("config_hash",)),
    ("git_revision", ("env", "git_revision")),
    ("hostname", ("env", "hostname")),
    *((f"version_{pkg.replace('-', '_')}", ("env", "versions", pkg)) for pkg in VERSION_PACKAGES),
)

# The training schedule the stage was configured with (its resolved config), and the train time it implies.
SCHEDULE_COLUMNS = ("configured_steps", "accumulate_grad_batches", "projected_train_s")
# The cell's one `generate` job (every eval stage of the cell): repeated on each row of the cell, count it once.
GENERATE_JOB_COLUMNS = ("gen_bench_s", "gen_bench_max_rss_mb", "gen_job_stages", "gen_job_samples", "gen_job_seconds")

RESULT_COLUMNS: tuple[str, ...] = (
    *KNOB_COLUMNS,
    "stage", "status", "error",
    *(name for name, _ in _MEASUREMENT_FIELDS),
    *METRICS,
    *(name for name, _ in _EVAL_FIELDS),
    "decoding",                                    # JSON of the decoding config: must be one value per report
    *(f"baseline_{m}" for m in METRICS),
    *(f"delta_{m}" for m in METRICS),
    *(f"blind_{m}" for m in METRICS),
    *(f"delta_blind_{m}" for m in METRICS),
    "bench_s", "bench_max_rss_mb",
    *SCHEDULE_COLUMNS,
    *GENERATE_JOB_COLUMNS,
    *(name for name, _ in _PROVENANCE_FIELDS),
)

# Columns that measure the run rather than the experiment (wall-clock speed, memory, the host): two runs of one
# config agree on every other column (seeded), but not on these. The reproduction checks compare everything else.
RUN_MEASUREMENT_COLUMNS: tuple[str, ...] = (
    "step_time_median_s", "step_time_p90_s", "samples_per_s", "tokens_per_s", "visual_tokens_per_s",
    "text_tokens_per_s", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib", "peak_host_rss_gib",
    "measured_peak_flops", "mfu", "mfu_measured_peak",
    "gen_tokens_per_s", "gen_latency_s_per_sample", "gen_prefill_s_per_sample", "gen_decode_tokens_per_s",
    "gen_end_to_end_tokens_per_s",
    "bench_s", "bench_max_rss_mb", "projected_train_s", "gen_bench_s", "gen_bench_max_rss_mb", "gen_job_seconds",
    "hostname",
)

VISION_RECIPE_COLUMNS: tuple[str, ...] = (
    "recipe_id", "name", "status", "error", "overlap", "resampler", "seed",
    *(name for name, _ in _MEASUREMENT_FIELDS),
    "bench_s", "bench_max_rss_mb",
    *SCHEDULE_COLUMNS,
    *(name for name, _ in _PROVENANCE_FIELDS),
)

# One row per Snakemake job the GPU-hour bill counts (jobs.csv): GPU jobs (train_*, generate) and the CPU score job.
JOB_COLUMNS: tuple[str, ...] = ("rule", "target", "gpu", "status", "devices", "bench_s", "bench_max_rss_mb",
                                "projected_s")
GPU_RULES = (*(f"train_{s}" for s in STAGE_NAMES), "generate")

NAN = float("nan")


def _dig(obj: Any, path: tuple[str, ...]) -> Any:
    """``obj[p0][p1]...`` or NaN when any level is absent or the value is null."""
    for key in path:
        if not isinstance(obj, Mapping) or key not in obj:
            return NAN
        obj = obj[key]
    return NAN if obj is None else obj


def _extract(record: Mapping[str, Any] | None, fields: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, Any]:
    return {name: (_dig(record, path) if record is not None else NAN) for name, path in fields}


def _resolve(path: str | None, root: Path) -> Path | None:
    if not path:
        return None
    p = Path(path)
    return p if p.is_absolute() else root / p


def _try_read_json(path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, reason): unreadable records make the stage failed, never crash the report."""
    if path is None:
        return None, "no path in manifest"
    if not path.is_file():
        return None, f"missing {path}"
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError) as err:
        logger.warning("unreadable record %s: %s", path, err)
        return None, f"unreadable {path}: {err}"
    if not isinstance(data, dict):
        return None, f"unreadable {path}: top level is {type(data).__name__}, expected an object"
    return data, None


def _log_lines(log: Path | None) -> list[str]:
    if log is None or not log.is_file():
        return []
    return [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]


def log_error_line(log: Path | None) -> str | None:
    """The most informative line of a job log: the last line mentioning "error" (any case); None if there is none."""
    for line in reversed(_log_lines(log)):
        if "error" in line.lower():
            return line
    return None


def _failure(problem: str, log: Path | None) -> str:
    """The error line of the log when it has one, else what is wrong with the record plus how the log ends."""
    line = log_error_line(log)
    if line is not None:
        return line
    lines = _log_lines(log)
    return f"{problem}; log {log} ends: {lines[-1]}" if lines else problem


def read_benchmark(path: Path | None) -> dict[str, float]:
    """``bench_s`` and ``bench_max_rss_mb`` from a Snakemake benchmark TSV (mean over repeats); NaN when absent."""
    out = {"bench_s": NAN, "bench_max_rss_mb": NAN}
    if path is None or not path.is_file():
        return out
    try:
        table = pd.read_csv(path, sep="\t")
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"benchmark TSV {path} is unreadable: {err}") from err
    for src, dst in (("s", "bench_s"), ("max_rss", "bench_max_rss_mb")):
        if src in table.columns:
            values = pd.to_numeric(table[src], errors="coerce")   # Snakemake writes "NA" where it cannot measure
            out[dst] = float(values.mean()) if values.notna().any() else NAN
    return out


def schedule(measurements: Mapping[str, Any] | None, stage: str, step_time_s: float) -> dict[str, float]:
    """Configured optimizer steps, gradient accumulation and the projected training time of ``stage``.

    The step clock (training/callbacks.py) times every micro-batch, so the projection is median micro-batch time x
    optimizer steps x accumulation. It leaves out validation, checkpoint writes, start-up (imports, model load, data
    setup, compile warm-up) and the evaluation: a lower bound of the job's wall time, which is ``bench_s``.
    """
    stage_cfg = _dig(measurements, ("resolved_config", "stages", stage)) if measurements else NAN
    if not isinstance(stage_cfg, Mapping):
        return {c: NAN for c in SCHEDULE_COLUMNS}
    steps = _as_float(stage_cfg.get("max_steps"))
    accum = _as_float(stage_cfg.get("accumulate_grad_batches", 1))
    return {"configured_steps": steps, "accumulate_grad_batches": accum,
            "projected_train_s": _as_float(step_time_s) * steps * accum}


def _metrics(record: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{m}": (_as_float(_dig(record, ("metrics", m))) if record else NAN) for m in METRICS}


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def _stage_row(cell: Mapping[str, Any], stage: str, root: Path, baseline: Mapping[str, Any] | None,
               blind: Mapping[str, Any] | None, generate_job: Mapping[str, float],
               upstream_failed: bool) -> dict[str, Any]:
    knobs = cell.get("knobs", {})
    row: dict[str, Any] = {"cell_id": cell["cell_id"], **{k: knobs.get(k, NAN) for k in KNOB_COLUMNS[1:]},
                           "stage": stage}
    train = cell.get("stages", {}).get(stage, {})
    ev = cell.get("evals", {}).get(stage, {})
    meas_path = _resolve(train.get("measurements"), root)
    metrics_path = _resolve(ev.get("metrics"), root)
    train_log = _resolve(train.get("log"), root)

    measurements, meas_problem = _try_read_json(meas_path)
    if measurements is not None and measurements.get("status", "completed") != "completed":
        meas_problem = f"{meas_path}: status {measurements.get('status')!r}"
    if ev and ev.get("metrics") is None and ev.get("generation"):
        # Unscored eval (speed configs: `score: false`): generation.json alone carries decoding speed.
        generation, metrics_problem = _try_read_json(_resolve(ev.get("generation"), root))
        metrics = {"generation": generation} if generation is not None else None
    else:
        metrics, metrics_problem = _try_read_json(metrics_path)

    error: str | None = None
    if meas_problem is not None:
        error = _failure(meas_problem, train_log)
        if upstream_failed and (train_log is None or not train_log.exists()):
            error = f"not run: an earlier stage of {cell['cell_id']} failed ({meas_problem})"
    elif metrics_problem is not None and ev:   # a stage without a configured eval has no metrics to miss
        error = _failure(metrics_problem, _resolve(ev.get("log"), root))
    row["status"] = "ok" if error is None else "failed"
    row["error"] = NAN if error is None else error

    row.update(_extract(measurements, _MEASUREMENT_FIELDS))
    row.update(_metrics(metrics))
    row.update(_extract(metrics, _EVAL_FIELDS))
    decoding = _dig(metrics, ("generation", "decoding")) if metrics else NAN
    row["decoding"] = json.dumps(decoding, sort_keys=True) if isinstance(decoding, Mapping) else NAN
    base = _metrics(baseline, "baseline_")
    row.update(base)
    for m in METRICS:
        row[f"delta_{m}"] = row[m] - base[f"baseline_{m}"]     # NaN propagates when either side is missing
    # The blind eval captions with one stage's checkpoint (finetune): only that row is compared with it.
    sighted = stage == EVAL_STAGES["blind"].weights
    blind_metrics = _metrics(blind if sighted else None, "blind_")
    row.update(blind_metrics)
    for m in METRICS:
        row[f"delta_blind_{m}"] = row[m] - blind_metrics[f"blind_{m}"]
    row.update(read_benchmark(_resolve(train.get("benchmark"), root)))
    row.update(schedule(measurements, stage, row["step_time_median_s"]))
    row.update(generate_job)
    row.update(_extract(measurements, _PROVENANCE_FIELDS))
    if measurements is None:
        # The eval record still says where the cell was meant to run; better than an empty device column.
        row["device"] = _dig(metrics, ("generation", "device")) if metrics else NAN
    return row


def _recipe_row(recipe: Mapping[str, Any], root: Path) -> dict[str, Any]:
    path = _resolve(recipe.get("measurements"), root)
    record, problem = _try_read_json(path)
    row: dict[str, Any] = {"recipe_id": recipe.get("recipe_id"), "name": recipe.get("name"),
                           "status": "ok" if problem is None else "failed", "error": problem if problem else NAN}
    for key in ("overlap", "resampler", "seed"):
        row[key] = _dig(record, ("knobs", key)) if record else NAN
    row.update(_extract(record, _MEASUREMENT_FIELDS))
    row.update(read_benchmark(_resolve(recipe.get("benchmark"), root)))
    row.update(schedule(record, "vision", row["step_time_median_s"]))
    row.update(_extract(record, _PROVENANCE_FIELDS))
    return row


def _generate_job(cell: Mapping[str, Any], root: Path) -> dict[str, float]:
    """The cell's generate job: its benchmark TSV and, summed over its eval stages, samples and decoding seconds.

    Samples/seconds are NaN unless every stage's generation.json is readable (a half-finished job is not a rate).
    """
    evals = cell.get("evals", {})
    out: dict[str, float] = dict.fromkeys(GENERATE_JOB_COLUMNS, NAN)
    if not evals:
        return out
    bench_paths = {e.get("benchmark") for e in evals.values() if e.get("benchmark")}
    if bench_paths:
        bench = read_benchmark(_resolve(sorted(bench_paths)[0], root))
        out["gen_bench_s"], out["gen_bench_max_rss_mb"] = bench["bench_s"], bench["bench_max_rss_mb"]
    out["gen_job_stages"] = float(len(evals))
    samples = seconds = 0.0
    for ev in evals.values():
        generation, _ = _try_read_json(_resolve(ev.get("generation"), root))
        n, t = _as_float(_dig(generation, ("num_samples",))), _as_float(_dig(generation, ("seconds",)))
        if generation is None or math.isnan(n) or math.isnan(t):
            return out
        samples, seconds = samples + n, seconds + t
    out["gen_job_samples"], out["gen_job_seconds"] = samples, seconds
    return out


def score_benchmark_path(manifest: Mapping[str, Any]) -> str:
    """The one score job's benchmark TSV: the manifest's ``score_benchmark`` or the workflow's path for it."""
    return str(manifest.get("score_benchmark") or f"benchmarks/{manifest.get('name', '?')}/score.tsv")


def jobs_table(results: pd.DataFrame, recipes: pd.DataFrame | None, score_benchmark: Path | None = None
               ) -> pd.DataFrame:
    """One row per job of the bill (:data:`JOB_COLUMNS`): stage-1 recipes, each cell's train jobs and generate job,
    and the CPU score job when its benchmark TSV is given and exists. ``projected_s`` is the training projection
    (NaN for generate and score)."""
    recipes = recipes if recipes is not None else pd.DataFrame(columns=list(VISION_RECIPE_COLUMNS))
    rows: list[dict[str, Any]] = []
    for _, r in recipes.iterrows():
        rows.append({"rule": "train_vision", "target": r["recipe_id"], "status": r["status"], "devices": r["devices"],
                     "bench_s": r["bench_s"], "bench_max_rss_mb": r["bench_max_rss_mb"],
                     "projected_s": r["projected_train_s"]})
    for cell_id, cell_rows in results.groupby("cell_id", sort=False):
        for _, r in cell_rows.iterrows():
            rows.append({"rule": f"train_{r['stage']}", "target": cell_id, "status": r["status"],
                         "devices": r["devices"], "bench_s": r["bench_s"], "bench_max_rss_mb": r["bench_max_rss_mb"],
                         "projected_s": r["projected_train_s"]})
        first = cell_rows.iloc[0]
        if not math.isnan(first["gen_job_stages"]):
            done = not math.isnan(first["gen_bench_s"])
            rows.append({"rule": "generate", "target": cell_id, "status": "ok" if done else "not run",
                         "devices": 1.0, "bench_s": first["gen_bench_s"],
                         "bench_max_rss_mb": first["gen_bench_max_rss_mb"], "projected_s": NAN})
    if score_benchmark is not None and score_benchmark.is_file():
        bench = read_benchmark(score_benchmark)
        rows.append({"rule": "score", "target": "all cells", "status": "ok", "devices": NAN, **bench,
                     "projected_s": NAN})
    table = pd.DataFrame(rows, columns=[c for c in JOB_COLUMNS if c != "gpu"])
    table.insert(2, "gpu", table["rule"].isin(GPU_RULES))
    return table


def load_manifest(manifest_path: str | os.PathLike) -> dict[str, Any]:
    path = Path(manifest_path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist (run `panobench plan` / the workflow's plan rule first)")
    try:
        manifest = read_json(path)
    except json.JSONDecodeError as err:
        raise InputError(f"manifest {path} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cells"), list):
        raise InputError(f"manifest {path} has no 'cells' list")
    for i, cell in enumerate(manifest["cells"]):
        if not isinstance(cell, dict) or "cell_id" not in cell:
            raise InputError(f"manifest {path}: cells[{i}] has no 'cell_id'")
    return manifest


def collect(manifest: Mapping[str, Any], root: str | os.PathLike = ".") -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, vision_recipes) tables for a loaded manifest; paths in it are relative to ``root``."""
    root = Path(root)
    rows = []
    for cell in manifest["cells"]:
        evals = cell.get("evals", {})
        baseline, _ = _try_read_json(_resolve(evals.get("baseline", {}).get("metrics"), root))
        blind, _ = _try_read_json(_resolve(evals.get("blind", {}).get("metrics"), root))
        generate_job = _generate_job(cell, root)
        failed_before = False
        for stage in TRAIN_STAGES:
            row = _stage_row(cell, stage, root, baseline, blind, generate_job, failed_before)
            failed_before = failed_before or row["status"] == "failed"
            rows.append(row)
    results = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    recipes = pd.DataFrame([_recipe_row(r, root) for r in manifest.get("vision_recipes", [])],
                           columns=list(VISION_RECIPE_COLUMNS))
    return results, recipes


def write_csv_atomic(df: pd.DataFrame, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def vision_recipes_path(out_csv: str | os.PathLike) -> Path:
    """Where the stage-1 recipe table lives: beside ``results.csv``."""
    return Path(out_csv).with_name("vision_recipes.csv")


def jobs_path(out_csv: str | os.PathLike) -> Path:
    """Where the per-job table of the GPU-hour bill lives: beside ``results.csv``."""
    return Path(out_csv).with_name("jobs.csv")


def aggregate(manifest_path: str | os.PathLike, out_csv: str | os.PathLike, *,
              root: str | os.PathLike = ".") -> pd.DataFrame:
    """Read every record named in the manifest and write ``out_csv`` (+ ``vision_recipes.csv``, ``jobs.csv``).

    Args:
        manifest_path: ``results/<name>/manifest.json`` from ``panobench plan``.
        out_csv: the tidy table to write (atomically); one row per cell x training stage.
        root: directory the manifest's relative paths are relative to (the workflow's working directory).

    Returns:
        The results table, columns exactly :data:`RESULT_COLUMNS`.
    """
    manifest = load_manifest(manifest_path)
    results, recipes = collect(manifest, root)
    failed = results[results["status"] == "failed"]
    for _, row in failed.iterrows():
        logger.warning("%s / %s failed: %s", row["cell_id"], row["stage"], row["error"])
    write_csv_atomic(results, out_csv)
    write_csv_atomic(recipes, vision_recipes_path(out_csv))
    score_tsv = _resolve(score_benchmark_path(manifest), Path(root))
    write_csv_atomic(jobs_table(results, recipes, score_tsv), jobs_path(out_csv))
    logger.info("wrote %s: %d rows (%d failed)", out_csv, len(results), len(failed))
    return results


def read_table(path: str | os.PathLike, required: tuple[str, ...] | list[str], what: str = "results table"
               ) -> pd.DataFrame:
    """Read a CSV, checking that the file exists, parses and has the ``required`` columns (InputError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist (run `panobench aggregate` first)")
    try:
        df = pd.read_csv(path, keep_default_na=True)
    except (OSError, ValueError, pd.errors.ParserError) as err:   # EmptyDataError is a ValueError
        raise InputError(f"{what} {path} is unreadable: {err}") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{what} {path} lacks columns {missing} (written by an older panobench? re-run `panobench "
                         "aggregate` on its manifest)")
    return df


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``results.csv``, checking that it has the fixed column set."""
    return read_table(path, RESULT_COLUMNS)

