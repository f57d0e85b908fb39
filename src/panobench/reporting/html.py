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
from panobench.reporting.aggregate import load_manifest, read_results, vision_recipes_path
from panobench.reporting.plots import FIGURES, make_figures
from panobench.reporting.tables import (
    CONTEXT_COLUMNS,
    HEADLINE_METRICS,
    best_rows,
    failed_table,
    format_mean_ci,
    format_value,
    headline_table,
    memory_column,
    ok_rows,
    ordered,
    provenance_table,
    resampler_order,
)
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


def _summary(df: pd.DataFrame, manifest: Mapping[str, Any], config_name: str) -> list[tuple[str, str]]:
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
        ("device", ", ".join(_unique(df, "device")) or "–"),
        ("git revision", ", ".join(_unique(df, "git_revision")) or "–"),
        ("report built", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC") + f" by panobench {__version__}"),
    ]


def _headline(df: pd.DataFrame) -> dict[str, Any]:
    summary = headline_table(df)
    best = best_rows(summary)
    _, mem_label = memory_column(ok_rows(df, "finetune"))   # the same choice headline_table makes
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


def _configs(manifest: Mapping[str, Any], root: Path, configs_dir: Path | None) -> list[dict[str, str]]:
    out = []
    for cell in manifest.get("cells", []):
        cid = cell["cell_id"]
        if configs_dir is not None:
            path = configs_dir / f"{cid}.yaml"
        elif cell.get("config"):
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
                 tiles: Mapping[float, str | os.PathLike] | None = None, configs_dir: str | os.PathLike | None = None,
                 title: str | None = None, root: str | os.PathLike = ".") -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/figures/*.png``; returns the HTML path.

    Args:
        results_csv: the table from :func:`~panobench.reporting.aggregate.aggregate` (``vision_recipes.csv``
            beside it is shown when present).
        manifest_path: the manifest the table was built from (cells, knobs, config paths).
        out_dir: report directory; other files in it (e.g. ``results.csv``) are left alone.
        tiles: overlap -> tiling contact sheet PNG, embedded as is.
        configs_dir: where ``<cell_id>.yaml`` resolved configs live; default: the manifest's ``config`` paths.
        title: page title; default ``panobench report: <config name>``.
        root: directory the manifest's relative paths are relative to.
    """
    results_csv, out_dir, root = Path(results_csv), Path(out_dir), Path(root)
    df = ordered(read_results(results_csv)).reset_index(drop=True)
    manifest = load_manifest(manifest_path)
    config_name = str(manifest.get("name", "?"))
    fig_dir = out_dir / "figures"
    failed = failed_table(df)
    full_columns = [c for c in df.columns if c not in ("decoding",)]
    with atomic_dir(fig_dir) as tmp_figs:
        pngs = make_figures(df, tmp_figs)
        figures = [{"name": name, "caption": FIGURES[name][1], "src": _data_uri(png), "file": f"figures/{png.name}"}
                   for name, png in pngs.items()]
        context = {
            "title": title or f"panobench report: {config_name}",
            "summary": _summary(df, manifest, config_name),
            "headline": _headline(df),
            "figures": figures,
            "tiles": _tiles(tiles or {}),
            "failed": _table(failed),
            "n_failed": len(failed),
            "n_rows": len(df),
            "results": _table(df, full_columns),
            "provenance": _table(provenance_table(df)),
            "configs": _configs(manifest, root, Path(configs_dir) if configs_dir else None),
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
