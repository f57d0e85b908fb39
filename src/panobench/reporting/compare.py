"""The reproduction check: do two ``results.csv`` files agree on the caption metrics within a tolerance?

A reader reruns a config on a second machine or cluster and compares: rows are matched by (``cell_id``,
``stage``); a row present in only one file, a different ``status`` or data fingerprint, or a caption metric that
differs by more than the absolute tolerance is a difference. Missing on both sides (NaN, e.g. SPICE without its
jars, or the resampler stage when it is not evaluated) is agreement; missing on one side only is a difference.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from panobench.errors import InputError
from panobench.reporting.aggregate import METRICS, read_table

KEY = ("cell_id", "stage")
DEFAULT_TOLERANCE = 0.002
# Every caption metric column of results.csv: the row's checkpoint, the untrained baseline and the blind eval.
COMPARED_METRICS: tuple[str, ...] = (*METRICS, *(f"baseline_{m}" for m in METRICS),
                                     *(f"blind_{m}" for m in METRICS))
# Compared for equality when both files have them: a reproduction on other data or a failed row is not one.
COMPARED_EXACT = ("status", "data_fingerprint")


@dataclass
class Comparison:
    """What :func:`compare_results` found; ``lines`` are the differences, one per line."""

    path_a: Path
    path_b: Path
    tolerance: float
    matched: int = 0
    columns: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def differs(self) -> bool:
        return bool(self.lines)


def _read(path: Path) -> pd.DataFrame:
    df = read_table(path, KEY)
    duplicated = df[df.duplicated(list(KEY), keep=False)]
    if not duplicated.empty:
        first = duplicated.iloc[0]
        raise InputError(f"results table {path}: cell_id {first['cell_id']!r} stage {first['stage']!r} appears "
                         f"{len(df[(df['cell_id'] == first['cell_id']) & (df['stage'] == first['stage'])])} times")
    return df.set_index(list(KEY))


def _number(value: object) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: object) -> str | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def compare_results(path_a: str | os.PathLike, path_b: str | os.PathLike,
                    tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Compare two results tables (see the module docstring); raises InputError for unusable input."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise InputError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    path_a, path_b = Path(path_a), Path(path_b)
    a, b = _read(path_a), _read(path_b)
    result = Comparison(path_a, path_b, tolerance)
    result.columns = [c for c in COMPARED_METRICS if c in a.columns and c in b.columns]
    for path, df in ((path_a, a), (path_b, b)):
        absent = [c for c in COMPARED_METRICS if c not in df.columns]
        if absent and any(c in result.columns for c in METRICS):
            result.notes.append(f"{path} has no columns {absent}: not compared")
    if not any(c in result.columns for c in METRICS):
        missing = path_a if not any(c in a.columns for c in METRICS) else path_b
        raise InputError(f"results table {missing} has none of the caption metric columns {list(METRICS)}")

    for key in a.index.difference(b.index, sort=False):
        result.lines.append(f"{key[0]} {key[1]}: only in {path_a}")
    for key in b.index.difference(a.index, sort=False):
        result.lines.append(f"{key[0]} {key[1]}: only in {path_b}")
    common = a.index.intersection(b.index, sort=False)
    result.matched = len(common)
    exact = [c for c in COMPARED_EXACT if c in a.columns and c in b.columns]
    for key in common:
        ra, rb = a.loc[key], b.loc[key]
        where = f"{key[0]} {key[1]}"
        for column in exact:
            va, vb = _text(ra[column]), _text(rb[column])
            if va is not None and vb is not None and va != vb:
                result.lines.append(f"{where} {column}: {va} vs {vb}")
        for column in result.columns:
            va, vb = _number(ra[column]), _number(rb[column])
            if math.isnan(va) and math.isnan(vb):
                continue
            if math.isnan(va) or math.isnan(vb):
                result.lines.append(f"{where} {column}: {va:.6g} vs {vb:.6g} (missing on one side)")
            elif abs(va - vb) > tolerance:
                result.lines.append(f"{where} {column}: {va:.6g} vs {vb:.6g} (|diff| {abs(va - vb):.3g} > "
                                    f"{tolerance:g})")
    return result


def summary_line(result: Comparison) -> str:
    if result.differs:
        return (f"{len(result.lines)} difference(s) between {result.path_a} and {result.path_b} "
                f"({result.matched} matched rows, tolerance {result.tolerance:g})")
    return (f"{result.path_a} and {result.path_b} agree: {result.matched} rows, {len(result.columns)} caption metric "
            f"columns within {result.tolerance:g}")
