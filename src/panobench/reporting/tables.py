"""Tables derived from ``results.csv``: seed summaries (mean and 95% CI), the headline table, failures, provenance.

The CI is the report's one interval method, :func:`panobench.reporting.stats.t_interval` (Student t over seeds);
NaN when fewer than 2 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from panobench.reporting.stats import ci95_halfwidth
from panobench.stages import FINAL_STAGE, PER_CELL_STAGES

# Fixed order (and, in plots.py, colour) of the resamplers everywhere in the report.
RESAMPLER_ORDER = ("mlp", "bimamba", "qformer", "perceiver")
GROUP_COLUMNS = ("vision_checkpoint", "resampler", "overlap")

# Headline columns: (column, label, higher_is_better)
HEADLINE_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("CIDEr", "CIDEr", True),
    ("Bleu_4", "BLEU-4", True),
    ("METEOR", "METEOR", True),
    ("ROUGE_L", "ROUGE-L", True),
    ("samples_per_s", "samples/s", True),
    ("step_time_median_s", "step time (s, median)", False),
    ("peak_memory_gib", "peak memory (GiB)", False),
)
# Shown on every headline row: a comparison between arms is only about the arm at equal visual-token budgets.
CONTEXT_COLUMNS = (("num_views", "views"), ("resampled_tokens_per_view", "tokens / view"),
                   ("visual_tokens_per_sample", "visual tokens / sample"))
PROVENANCE_COLUMNS = ("cell_id", "stage", "config_hash", "data_fingerprint", "kernel_path", "resampler_init",
                      "device", "version_torch", "version_transformers", "version_peft", "version_lightning",
                      "version_cuda", "git_revision")


def resampler_order(values: Iterable[str]) -> list[str]:
    """Known resamplers in :data:`RESAMPLER_ORDER`, then any others alphabetically."""
    present = {str(v) for v in values if isinstance(v, str)}
    return [r for r in RESAMPLER_ORDER if r in present] + sorted(present - set(RESAMPLER_ORDER))


def ordered(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by vision checkpoint (first-seen order), resampler (fixed order), overlap, then seed and stage."""
    if df.empty:
        return df
    vis_rank = {v: i for i, v in enumerate(pd.unique(df["vision_checkpoint"]))}
    res_rank = {r: i for i, r in enumerate(resampler_order(df["resampler"]))}
    keys = pd.DataFrame({"v": df["vision_checkpoint"].map(vis_rank), "r": df["resampler"].map(res_rank),
                         "o": df["overlap"]}, index=df.index)
    if "seed" in df:
        keys["s"] = df["seed"]
    if "stage" in df:
        keys["t"] = df["stage"].map({stage: i for i, stage in enumerate(PER_CELL_STAGES)})
    return df.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def memory_column(df: pd.DataFrame) -> tuple[str, str]:
    """(column, label) of the peak memory to show: GPU allocated when any row has it, else host RSS."""
    if "peak_gpu_allocated_gib" in df and df["peak_gpu_allocated_gib"].notna().any():
        return "peak_gpu_allocated_gib", "peak GPU memory allocated (GiB)"
    return "peak_host_rss_gib", "peak host RSS (GiB)"


def with_peak_memory(df: pd.DataFrame) -> pd.DataFrame:
    col, _ = memory_column(df)
    out = df.copy()
    out["peak_memory_gib"] = out[col]
    return out


def ok_rows(df: pd.DataFrame, stage: str | None = None) -> pd.DataFrame:
    out = df[df["status"] == "ok"]
    if stage is not None:
        out = out[out["stage"] == stage]
    return out


def summarize(df: pd.DataFrame, value_columns: Sequence[str],
              group_columns: Sequence[str] = GROUP_COLUMNS) -> pd.DataFrame:
    """Mean, 95% CI half-width (t) and seed count of each value column per group.

    Returns one row per group with ``<col>_mean``, ``<col>_ci`` and ``n_seeds`` (finite rows per group).
    """
    columns = [*group_columns, "n_seeds", *(f"{c}_{s}" for c in value_columns for s in ("mean", "ci"))]
    if df.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, group in df.groupby(list(group_columns), sort=False, dropna=False):
        row = dict(zip(group_columns, key if isinstance(key, tuple) else (key,), strict=True))
        row["n_seeds"] = int(group["seed"].nunique())
        for c in value_columns:
            values = pd.to_numeric(group[c], errors="coerce")
            row[f"{c}_mean"] = float(values.mean()) if values.notna().any() else math.nan
            row[f"{c}_ci"] = ci95_halfwidth(values)
        rows.append(row)
    return ordered(pd.DataFrame(rows, columns=columns)).reset_index(drop=True)


def headline_table(df: pd.DataFrame, stage: str = FINAL_STAGE) -> pd.DataFrame:
    """Seed summary of the successful cells of ``stage`` per vision checkpoint x resampler x overlap."""
    data = with_peak_memory(ok_rows(df, stage))
    values = [c for c, _, _ in HEADLINE_METRICS] + [c for c, _ in CONTEXT_COLUMNS]
    return summarize(data, values)


def best_rows(summary: pd.DataFrame) -> dict[str, set[int]]:
    """Per headline metric, the row indices holding the best mean (ties all count)."""
    best: dict[str, set[int]] = {}
    for col, _, higher in HEADLINE_METRICS:
        means = summary.get(f"{col}_mean")
        if means is None or means.notna().sum() == 0:
            best[col] = set()
            continue
        target = means.max() if higher else means.min()
        best[col] = set(summary.index[np.isclose(means, target, rtol=1e-12, atol=0.0)])
    return best


def format_value(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    magnitude = abs(value)
    if magnitude != 0 and (magnitude >= 1e5 or magnitude < 1e-3):
        return f"{value:.{digits - 1}e}"
    if float(value).is_integer() and magnitude >= 1:
        return f"{value:.0f}"
    return f"{value:.{digits}g}" if magnitude >= 1 else f"{value:.{digits}f}"


def format_interval(mean: float, low: float, high: float, digits: int = 3) -> str:
    """``+0.031 [−0.012, +0.074]``: all three with the decimals that give the largest ``digits`` significant
    digits, so the bounds line up with the mean; just the signed mean when there is no interval."""
    if mean is None or math.isnan(mean):
        return "–"
    values = [v for v in (mean, low, high) if not math.isnan(v)]
    largest = max(abs(v) for v in values)
    decimals = 0 if largest == 0 else max(0, digits - 1 - math.floor(math.log10(largest)))
    spec = f"+.{digits - 1}e" if 0 < largest < 1e-3 else f"+.{decimals}f"   # tiny values: exponent, not 0.0000012

    def signed(v: float) -> str:
        text = format(v, spec)
        return "0" if float(text) == 0 else text.replace("-", "−")

    text = signed(mean)
    if not (math.isnan(low) or math.isnan(high)):
        text += f" [{signed(low)}, {signed(high)}]"
    return text


def format_mean_ci(mean: float, ci: float, digits: int = 3) -> str:
    """``mean ± ci`` (or just the mean when there is no CI)."""
    text = format_value(mean, digits)
    if not (isinstance(ci, float) and math.isnan(ci)) and text != "–":
        # Float noise between equal values (1e-14) is no uncertainty: show it as the zero it is.
        ci = 0.0 if abs(ci) <= 1e-9 * max(1.0, abs(mean)) else ci
        text += f" ± {format_value(ci, digits)}"
    return text


def failed_table(df: pd.DataFrame) -> pd.DataFrame:
    return ordered(df[df["status"] == "failed"])[["cell_id", "stage", "error"]].reset_index(drop=True)


def provenance_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell x stage that recorded something (failed stages without records are left out).

    The data fingerprint is shortened to its first 12 hex digits (results.csv has all 64).
    """
    has_record = df["config_hash"].notna() | df["device"].notna()
    table = ordered(df[has_record])[list(PROVENANCE_COLUMNS)].reset_index(drop=True)
    table["data_fingerprint"] = table["data_fingerprint"].map(
        lambda v: v[:12] + "…" if isinstance(v, str) and len(v) > 12 else v)
    return table
