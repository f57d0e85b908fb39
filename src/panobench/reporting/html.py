"""The comparison report: one self-contained ``report.html`` (figures embedded as base64 PNG, inline CSS) + PNGs.

Everything shown comes from ``results.csv`` (built by :mod:`panobench.reporting.aggregate`), the manifest, the
per-cell resolved config YAMLs and the tiling contact sheets. All values from files go through Jinja's
autoescaping: an error message or a config value can never inject markup into the report.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd

from panobench import __version__
from panobench.errors import InputError
from panobench.reporting.aggregate import (
    GPU_RULES,
    JOB_COLUMNS,
    jobs_path,
    jobs_table,
    load_manifest,
    read_results,
    read_table,
    vision_recipes_path,
)
from panobench.reporting.bill import HOUR, measured_by_rule
from panobench.reporting.checks import fingerprints, token_budget_warning
from panobench.reporting.paired import (
    KNOB_LABELS,
    PAIRED_METRICS,
    REFERENCES,
    max_seeds,
    paired_differences,
    reference_differences,
    verdict_kind,
)
from panobench.reporting.plots import FIGURES, make_figures
from panobench.reporting.stats import METHOD
from panobench.reporting.tables import (
    CONTEXT_COLUMNS,
    HEADLINE_METRICS,
    best_rows,
    failed_table,
    format_interval,
    format_mean_ci,
    format_value,
    headline_table,
    memory_column,
    ok_rows,
    ordered,
    provenance_table,
    resampler_order,
)
from panobench.stages import FINAL_STAGE, PER_CELL_STAGES
from panobench.utils.io import atomic_dir, atomic_path

logger = logging.getLogger(__name__)

TEMPLATE_DIR = Path(__file__).parent / "templates"
TEMPLATE_NAME = "report.html.j2"


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def _cell(value: Any) -> str:
    """A table cell's text: numbers compactly, NaN as a dash, everything else as str (escaped by Jinja)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return format_value(value, 4)
    return str(value)


def _unique(df: pd.DataFrame, column: str) -> list[str]:
    if column not in df or df.empty:
        return []
    return [str(v) for v in pd.unique(df[column].dropna())]


def _summary(df: pd.DataFrame, manifest: Mapping[str, Any], config_name: str,
             recipes: pd.DataFrame | None) -> list[tuple[str, str]]:
    cells = manifest.get("cells", [])
    knob = {k: sorted({c.get("knobs", {}).get(k) for c in cells} - {None}, key=str)
            for k in ("overlap", "fov", "seed")}
    resamplers = resampler_order({c.get("knobs", {}).get("resampler") for c in cells})
    vision = list(dict.fromkeys(c.get("knobs", {}).get("vision_checkpoint") for c in cells))
    n_ok = int((df["status"] == "ok").sum())
    return [
        ("config name", config_name),
        ("cells", f"{len(cells)} ({len(knob['overlap'])} overlaps × {len(resamplers)} resamplers × "
                  f"{len(vision)} vision checkpoints × {len(knob['seed'])} seeds)"),
        ("training stages", ", ".join(pd.unique(df["stage"])) if not df.empty else "–"),
        ("stage results", f"{n_ok} ok, {len(df) - n_ok} failed (of {len(df)} cell × stage)"),
        ("overlaps", ", ".join(f"{o:.2f}" for o in knob["overlap"])),
        ("field of view", ", ".join(f"{f:g}°" for f in knob["fov"])),
        ("resamplers", ", ".join(resamplers)),
        ("vision checkpoints", ", ".join(str(v) for v in vision)),
        ("seeds", ", ".join(str(s) for s in knob["seed"])),
        ("visual-token budget", _budget_text(df, manifest)),
        ("data fingerprint", fingerprints(df, recipes).text),
        ("intervals", METHOD),
        ("device", ", ".join(_unique(df, "device")) or "–"),
        ("git revision", ", ".join(_unique(df, "git_revision")) or "–"),
        ("report built", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f" by panobench {__version__}"),
    ]


def _budget_text(df: pd.DataFrame, manifest: Mapping[str, Any]) -> str:
    configured = manifest.get("tokens_per_view")
    text = (f"{configured} visual tokens per view for every arm (config tokens_per_view)" if configured is not None
            else "not set in the config (tokens_per_view: null): each resampler's own parameters decide")
    if token_budget_warning(df) is not None:
        text += " — the arms differ, see the warning at the top"
    return text


def _alerts(df: pd.DataFrame, recipes: pd.DataFrame | None) -> list[dict[str, str]]:
    """Warnings shown at the top of the report, above everything else."""
    alerts = []
    budget = token_budget_warning(df)
    if budget is not None:
        alerts.append({"id": "budget-alert", "title": "Arms differ in visual tokens per view",
                       "text": budget.message + " Tokens per view and per sample are shown on every headline row."})
    prints = fingerprints(df, recipes)
    if len(prints.counts) > 1:
        alerts.append({"id": "data-alert", "title": "Cells were trained or evaluated on different data",
                       "text": f"{len(prints.counts)} data fingerprints: {prints.text}. Metrics of cells with "
                               "different fingerprints are not comparable; see the provenance table."})
    return alerts


def _paired(df: pd.DataFrame) -> dict[str, Any]:
    """The paired-comparison tables: one row per knob level pair, one column per metric (value [interval], verdict)."""
    summary, breakdown = paired_differences(df)
    metrics = [(c, label) for c, label in PAIRED_METRICS if c in set(summary["metric"])]
    headers = ["knob", "A → B", "n seeds", *(f"Δ {label} (B − A)" for _, label in metrics)]
    rows = []
    for (knob, a, b), group in summary.groupby(["knob", "level_a", "level_b"], sort=False):
        by_metric = group.set_index("metric")
        cells = []
        for metric, _ in metrics:
            if metric not in by_metric.index:
                cells.append({"text": "–", "verdict": "", "cls": ""})
                continue
            r = by_metric.loc[metric]
            cells.append({"text": format_interval(r["mean"], r["low"], r["high"]), "verdict": r["verdict"],
                          "cls": _verdict_class(r["verdict"], f"{b} better", f"{a} better")})
        n = by_metric["n"].max()
        pair = f"{a} → {b}".replace("overlap ", "")     # the knob column already says "overlap"
        rows.append({"knob": KNOB_LABELS[knob], "pair": pair, "n": str(int(n)), "cells": cells})
    labels = dict(PAIRED_METRICS)
    detail = breakdown.assign(
        knob=breakdown["knob"].map(KNOB_LABELS), metric=breakdown["metric"].map(labels),
        pair=(breakdown["level_a"] + " → " + breakdown["level_b"]).str.replace("overlap ", "", regex=False),
        difference=[format_interval(m, lo, hi) for m, lo, hi in zip(breakdown["mean"], breakdown["low"],
                                                                    breakdown["high"], strict=True)])
    return {"headers": headers, "rows": rows, "seeds": max_seeds(df),
            "breakdown": _table(detail, ["knob", "pair", "setting", "metric", "n", "difference", "verdict"])}


# CSS class of each verdict kind (the report's stylesheet colours them).
_VERDICT_CLASS = {"b": "better", "a": "worse", "untestable": "untestable", "none": "nodiff"}


def _verdict_class(verdict: str, b_better: str, a_better: str) -> str:
    return _VERDICT_CLASS[verdict_kind(verdict, b_better, a_better)]


def _image_effect(df: pd.DataFrame) -> dict[str, Any]:
    """Trained vs untrained baseline and trained vs blind, CIDEr first; every metric in a long table."""
    refs = reference_differences(df)
    present = [r for r in REFERENCES if r in set(refs["reference"])]
    headers = ["vision", "resampler", "overlap", "n seeds", "trained CIDEr"]
    for reference in present:
        _, name, _, _ = REFERENCES[reference]
        label = "untrained baseline" if reference == "baseline" else "blind (grey image)"
        headers += [f"{label} CIDEr", f"{name}", "verdict"]
    rows = []
    cider = refs[refs["metric"] == "CIDEr"]
    for setting, group in cider.groupby("setting", sort=False):
        by_ref = group.set_index("reference")
        first = group.iloc[0]
        where = ([setting, "", ""] if setting == "all cells" else
                 [str(first["vision_checkpoint"]), str(first["resampler"]), f"{first['overlap']:.2f}"])
        cells = [*({"text": w, "cls": ""} for w in where), {"text": str(int(group["n"].max())), "cls": ""},
                 {"text": format_value(first["trained"]), "cls": ""}]
        for reference in present:
            if reference not in by_ref.index:
                cells += [{"text": "–", "cls": ""}] * 3
                continue
            r = by_ref.loc[reference]
            _, _, helps, hurts = REFERENCES[reference]
            cells += [{"text": format_value(r["reference_value"]), "cls": ""},
                      {"text": format_interval(r["mean"], r["low"], r["high"]), "cls": ""},
                      {"text": r["verdict"], "cls": _verdict_class(r["verdict"], helps, hurts)}]
        rows.append(cells)
    long = refs.assign(comparison=refs["reference"].map(lambda r: REFERENCES[r][1]),
                       metric=refs["metric"].map(dict(PAIRED_METRICS)),
                       difference=[format_interval(m, lo, hi) for m, lo, hi in zip(refs["mean"], refs["low"],
                                                                                   refs["high"], strict=True)])
    return {"headers": headers, "rows": rows, "has_blind": "blind" in present,
            "all": _table(long, ["comparison", "setting", "metric", "n", "trained", "reference_value", "difference",
                                 "verdict"])}


def _bill(results_csv: Path, df: pd.DataFrame, recipes: pd.DataFrame | None) -> dict[str, Any] | None:
    """Measured wall time of every job (jobs.csv) and the projected training time, per cell and in total."""
    path = jobs_path(results_csv)
    jobs = read_table(path, JOB_COLUMNS, what="job table") if path.is_file() else jobs_table(df, recipes)
    if jobs.empty:
        return None
    wall = pd.to_numeric(jobs["bench_s"], errors="coerce")
    projected = pd.to_numeric(jobs["projected_s"], errors="coerce")
    per_cell = []
    schedule = df.set_index(["cell_id", "stage"])
    gpu_jobs = jobs[jobs["rule"] != "score"]
    for target, group in gpu_jobs.groupby("target", sort=False):
        by_rule = dict(zip(group["rule"], wall[group.index], strict=True))
        proj = projected[group.index].sum(min_count=1)
        row = [target, *(format_value(by_rule.get(r, math.nan)) for r in GPU_RULES),
               format_value(wall[group.index].sum(min_count=1)), format_value(proj)]
        steps = []
        for stage in PER_CELL_STAGES:
            if (target, stage) in schedule.index:
                r = schedule.loc[(target, stage)]
                steps.append(f"{format_value(r['configured_steps'])}×{format_value(r['accumulate_grad_batches'])}")
        row.append(" / ".join(steps) if steps else "–")
        per_cell.append(row)
    totals = measured_by_rule(jobs)
    gpu = totals[totals["gpu"]]
    score = jobs[jobs["rule"] == "score"]
    measured_jobs = int(gpu["measured"].sum())
    summary = [
        ("GPU jobs (train_*, generate)", f"{int(gpu['jobs'].sum())}, {measured_jobs} with a benchmark TSV"),
        ("measured GPU-hours", f"{gpu['gpu_hours'].sum():.3f} (wall time × devices of the GPU jobs)"),
        ("projected training GPU-hours", f"{projected[jobs['gpu'].astype(str).str.lower() == 'true'].sum() / HOUR:.3f}"
                                         " (median step time × configured steps × accumulation; no validation, "
                                         "start-up or evaluation)"),
        ("score job (CPU)", f"{format_value(wall[score.index].sum(min_count=1))} s" if not score.empty
         else "no benchmark recorded"),
    ]
    per_rule = [[r["rule"], "GPU" if r["gpu"] else "CPU", str(r["jobs"]), str(r["measured"]),
                 format_value(r["wall_hours"] * HOUR), f"{r['wall_hours']:.3f}",
                 f"{r['projected_train_hours']:.3f}" if r["rule"].startswith("train_") else "–"]
                for _, r in totals.iterrows()]
    device_types = set(_unique(df, "device_type"))
    devices = ", ".join(_unique(df, "device")) or "–"
    if device_types == {"cpu"}:
        devices += " — a CPU run: the “GPU” jobs' hours are CPU wall time"
    return {"summary": summary,
            "per_rule": {"headers": ["job", "runs on", "jobs", "measured", "wall (s)", "wall (h)",
                                     "projected train (h)"], "rows": per_rule},
            "per_cell": {"headers": ["cell / recipe", *(f"{r} (s)" for r in GPU_RULES), "GPU wall total (s)",
                                     "projected train (s)",
                                     f"steps × accumulation ({' / '.join(PER_CELL_STAGES)})"], "rows": per_cell},
            "devices": devices}


def _headline(df: pd.DataFrame) -> dict[str, Any]:
    summary = headline_table(df)
    best = best_rows(summary)
    _, mem_label = memory_column(ok_rows(df, FINAL_STAGE))   # the same choice headline_table makes
    headers = ["vision", "resampler", "overlap", "seeds"]
    headers += [mem_label if c == "peak_memory_gib" else label
                for c, label, _ in HEADLINE_METRICS]
    headers += [label for _, label in CONTEXT_COLUMNS]
    rows = []
    for idx, r in summary.iterrows():
        cells = [{"text": str(r["vision_checkpoint"]), "best": False}, {"text": str(r["resampler"]), "best": False},
                 {"text": f"{r['overlap']:.2f}", "best": False}, {"text": str(r["n_seeds"]), "best": False}]
        for col, _, _ in HEADLINE_METRICS:
            cells.append({"text": format_mean_ci(r[f"{col}_mean"], r[f"{col}_ci"]), "best": idx in best[col]})
        for col, _ in CONTEXT_COLUMNS:
            cells.append({"text": format_value(r[f"{col}_mean"]), "best": False})
        rows.append(cells)
    multi_seed = bool(len(summary)) and int(summary["n_seeds"].max()) >= 2
    return {"headers": headers, "rows": rows, "multi_seed": multi_seed}


def _table(df: pd.DataFrame, columns: list[str] | None = None) -> dict[str, Any]:
    columns = list(columns or df.columns)
    return {"headers": columns, "rows": [[_cell(v) for v in row] for row in df[columns].itertuples(index=False)]}


def _configs(manifest: Mapping[str, Any], root: Path) -> list[dict[str, str]]:
    """Each cell's resolved config as written by the workflow (the manifest's ``config`` path)."""
    out = []
    for cell in manifest.get("cells", []):
        cid = cell["cell_id"]
        if cell.get("config"):
            path = Path(cell["config"]) if Path(cell["config"]).is_absolute() else root / cell["config"]
        else:
            path = None
        if path is not None and path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
        else:
            text = f"(resolved config not found: {path})"
        out.append({"cell_id": cid, "path": str(path), "text": text})
    return out


def _decodings(df: pd.DataFrame) -> list[dict[str, str]]:
    out = []
    for value in _unique(df, "decoding"):
        try:
            pretty = json.dumps(json.loads(value), indent=2, sort_keys=True)
        except json.JSONDecodeError:
            pretty = value
        stages = df[df["decoding"] == value]
        out.append({"config": pretty, "used_by": f"{stages['cell_id'].nunique()} cells, stages "
                                                  f"{', '.join(pd.unique(stages['stage']))}"})
    return out


def _tiles(tiles: Mapping[float, str | os.PathLike]) -> list[dict[str, str]]:
    out = []
    for overlap in sorted(tiles):
        path = Path(tiles[overlap])
        if not path.is_file():
            raise InputError(f"tiling contact sheet for overlap {overlap} not found: {path}")
        if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            raise InputError(f"tiling contact sheet {path} is not a PNG file")
        out.append({"overlap": f"{float(overlap):.2f}", "src": _data_uri(path), "path": str(path)})
    return out


def _recipes(results_csv: Path) -> dict[str, Any] | None:
    path = vision_recipes_path(results_csv)
    if not path.is_file():
        return None
    recipes = pd.read_csv(path)
    if recipes.empty:
        return None
    columns = [c for c in ("recipe_id", "status", "error", "overlap", "resampler", "seed", "num_views",
                           "step_time_median_s", "samples_per_s", "tokens_per_s", "peak_gpu_allocated_gib",
                           "peak_gpu_reserved_gib", "peak_host_rss_gib", "params_trainable", "params_total",
                           "loss_last", "kernel_path", "device", "config_hash") if c in recipes.columns]
    return _table(recipes, columns)


def render_report(context: Mapping[str, Any]) -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env.get_template(TEMPLATE_NAME).render(**context)


def build_report(results_csv: str | os.PathLike, manifest_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 tiles: Mapping[float, str | os.PathLike] | None = None, title: str | None = None,
                 root: str | os.PathLike = ".") -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/figures/*.png``; returns the HTML path.

    Args:
        results_csv: the table from :func:`~panobench.reporting.aggregate.aggregate` (``vision_recipes.csv``
            beside it is shown when present).
        manifest_path: the manifest the table was built from (cells, knobs, config paths).
        out_dir: report directory; other files in it (e.g. ``results.csv``) are left alone.
        tiles: overlap -> tiling contact sheet PNG, embedded as is.
        title: page title; default ``panobench report: <config name>``.
        root: directory the manifest's relative paths are relative to.
    """
    results_csv, out_dir, root = Path(results_csv), Path(out_dir), Path(root)
    df = ordered(read_results(results_csv)).reset_index(drop=True)
    recipes_csv = vision_recipes_path(results_csv)
    recipes = read_table(recipes_csv, ("recipe_id", "status"), what="vision recipe table") \
        if recipes_csv.is_file() else None
    manifest = load_manifest(manifest_path)
    config_name = str(manifest.get("name", "?"))
    fig_dir = out_dir / "figures"
    failed = failed_table(df)
    full_columns = [c for c in df.columns if c not in ("decoding",)]
    with atomic_dir(fig_dir) as tmp_figs:
        pngs = make_figures(df, tmp_figs)
        figures = {name: {"name": name, "caption": FIGURES[name][1], "src": _data_uri(png),
                          "file": f"figures/{png.name}"} for name, png in pngs.items()}
        own_section = ("paired_differences", "image_effect", "baseline_deltas")
        context = {
            "title": title or f"panobench report: {config_name}",
            "alerts": _alerts(df, recipes),
            "summary": _summary(df, manifest, config_name, recipes),
            "headline": _headline(df),
            "method": METHOD,
            "paired": _paired(df),
            "image": _image_effect(df),
            "fig": figures,
            "figures": [f for name, f in figures.items() if name not in own_section],
            "bill": _bill(results_csv, df, recipes),
            "tiles": _tiles(tiles or {}),
            "failed": _table(failed),
            "n_failed": len(failed),
            "n_rows": len(df),
            "results": _table(df, full_columns),
            "provenance": _table(provenance_table(df)),
            "data_fingerprint": fingerprints(df, recipes).text,
            "configs": _configs(manifest, root),
            "decodings": _decodings(df),
            "recipes": _recipes(results_csv),
        }
        html_text = render_report(context)
        out_html = out_dir / "report.html"
        with atomic_path(out_html) as tmp:
            tmp.write_text(html_text, encoding="utf-8")
    logger.info("wrote %s (%d figures, %d failed cell stages)", out_html, len(figures), len(failed))
    return out_html


def parse_tiles(items: list[str]) -> dict[float, Path]:
    """``OVERLAP=PNG`` strings (CLI) -> {overlap: path}."""
    out: dict[float, Path] = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            overlap = float(key)
        except ValueError:
            overlap = math.nan
        if not sep or not value or math.isnan(overlap):
            raise InputError(f"--tiles expects OVERLAP=PNG (e.g. 0.5=results/x/tiles/ov0.50.png), got {item!r}")
        out[overlap] = Path(value)
    return out
