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
from panobench.utils.io import atomic_path, read_json

logger = logging.getLogger(__name__)

TRAIN_STAGES = ("resampler", "finetune")
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
    ("visual_tokens_per_sample", ("tokens", "visual_tokens_per_sample")),
    ("text_tokens_per_sample", ("tokens", "text_tokens_per_sample")),
    ("measured_steps", ("speed", "measured_steps")),
    ("step_time_median_s", ("speed", "step_time_median_s")),
    ("step_time_p90_s", ("speed", "step_time_p90_s")),
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
    ("params_trainable", ("params", "trainable")),
    ("params_total", ("params", "total")),
    ("kernel_path", ("kernel_path",)),
    ("resampler_init", ("resampler_init",)),
    ("loss_first", ("loss", "first")),
    ("loss_last", ("loss", "last")),
    ("loss_best_val", ("loss", "best_val")),
)
_EVAL_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gen_tokens_per_s", ("generation", "tokens_per_s")),
    ("gen_latency_s_per_sample", ("generation", "latency_s_per_sample")),
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

RESULT_COLUMNS: tuple[str, ...] = (
    *KNOB_COLUMNS,
    "stage", "status", "error",
    *(name for name, _ in _MEASUREMENT_FIELDS),
    *METRICS,
    *(name for name, _ in _EVAL_FIELDS),
    "decoding",                                    # JSON of the decoding config: must be one value per report
    *(f"baseline_{m}" for m in METRICS),
    *(f"delta_{m}" for m in METRICS),
    "bench_s", "bench_max_rss_mb",
    *(name for name, _ in _PROVENANCE_FIELDS),
)

VISION_RECIPE_COLUMNS: tuple[str, ...] = (
    "recipe_id", "name", "status", "error", "overlap", "resampler", "seed",
    *(name for name, _ in _MEASUREMENT_FIELDS),
    *(name for name, _ in _PROVENANCE_FIELDS),
)

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


def _metrics(record: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    return {f"{prefix}{m}": (_as_float(_dig(record, ("metrics", m))) if record else NAN) for m in METRICS}


def _as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return NAN


def _stage_row(cell: Mapping[str, Any], stage: str, root: Path, baseline: Mapping[str, Any] | None,
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
    row.update(read_benchmark(_resolve(train.get("benchmark"), root)))
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
    row.update(_extract(record, _PROVENANCE_FIELDS))
    return row


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
        baseline_path = _resolve(cell.get("evals", {}).get("baseline", {}).get("metrics"), root)
        baseline, _ = _try_read_json(baseline_path)
        failed_before = False
        for stage in TRAIN_STAGES:
            row = _stage_row(cell, stage, root, baseline, failed_before)
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


def aggregate(manifest_path: str | os.PathLike, out_csv: str | os.PathLike, *,
              root: str | os.PathLike = ".") -> pd.DataFrame:
    """Read every record named in the manifest and write ``out_csv`` (+ ``vision_recipes.csv`` beside it).

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
    logger.info("wrote %s: %d rows (%d failed)", out_csv, len(results), len(failed))
    return results


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``results.csv``, checking that it has the fixed column set."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"results table {path} does not exist (run `panobench aggregate` first)")
    df = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in RESULT_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"results table {path} lacks columns {missing} (written by another panobench version?)")
    return df


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
