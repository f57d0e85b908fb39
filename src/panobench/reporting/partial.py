"""The report of a run that failed part-way (``snakemake --keep-going``): what finished, with the rest marked failed.

Snakemake's ``onerror`` handler calls ``panobench partial-report`` once, after the run has stopped. When a cell
fails, the one ``score`` job (which needs every cell's predictions) and the ``aggregate_results`` /
``build_report`` rules never run, so this does their work for whatever exists: score the predictions whose
generation finished, write the manifest, aggregate, and build the report. Aggregation already marks every cell
stage without its records as ``failed`` with the error line of its job's log, so nothing here decides status.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from panobench import matrix as pm
from panobench.utils.io import write_json_atomic

logger = logging.getLogger(__name__)


def unscored_predictions(manifest: dict[str, Any]) -> list[tuple[Path, Path]]:
    """``(predictions.csv, metrics.json)`` of every evaluation whose generation finished but that has no metrics.

    Generation is finished when ``generation.json`` exists (it is written after ``predictions.csv``); evaluations
    of a config that does not score (``metrics`` is null in the manifest) are never listed.
    """
    out = []
    for cell in manifest["cells"]:
        for record in cell["evals"].values():
            if record.get("metrics") is None:
                continue
            predictions, metrics = Path(record["predictions"]), Path(record["metrics"])
            if predictions.is_file() and Path(record["generation"]).is_file() and not metrics.exists():
                out.append((predictions, metrics))
    return out


def existing_tiles(wf: dict[str, Any]) -> dict[float, Path]:
    """overlap -> contact sheet, for the sheets that were drawn before the run stopped."""
    sheets = {float(o): Path(pm.tiles_sheet_path(wf, o)) for o in wf["matrix"]["overlaps"]}
    return {o: p for o, p in sheets.items() if p.is_file()}


def partial_report(wf: dict[str, Any]) -> Path:
    """Score what finished, then write the manifest, ``results.csv`` and ``report.html`` of workflow config ``wf``.

    Paths are the workflow's (:mod:`panobench.matrix`), relative to the working directory, as in the rules.

    Args:
        wf: the validated workflow config (Snakemake's ``config``).

    Returns:
        The written ``report.html``.
    """
    from panobench.evaluation.predictions import score_predictions_files
    from panobench.reporting.aggregate import aggregate
    from panobench.reporting.html import build_report

    manifest = pm.manifest(wf)
    manifest_file = pm.manifest_path(wf)
    write_json_atomic(manifest_file, manifest)
    unscored = unscored_predictions(manifest)
    if unscored:
        logger.info("scoring %d finished evaluation(s) the score job did not reach", len(unscored))
        score_predictions_files(unscored)
    out = Path(pm.report_dir(wf))
    results = out / "results.csv"
    aggregate(manifest_file, results)
    return build_report(results, manifest_file, out, tiles=existing_tiles(wf))
