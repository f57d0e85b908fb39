"""Tables derived from ``results.csv``: seed summaries (mean and 95% CI), the headline table, failures, provenance.

The CI in tables is the Student-t interval of the mean over seeds (half-width t_{0.975, n-1} * sd / sqrt(n)):
with 2-3 seeds a bootstrap interval (what seaborn draws) collapses to the range of the values, which
understates the uncertainty; the t interval is the honest one for tiny n. NaN when fewer than 2 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

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
CONTEXT_COLUMNS = (("num_views", "views"), ("visual_tokens_per_sample", "visual tokens"))
PROVENANCE_COLUMNS = ("cell_id", "stage", "config_hash", "kernel_path", "resampler_init", "device", "version_torch",
                      "version_transformers", "version_peft", "version_lightning", "version_cuda", "git_revision")


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
        keys["t"] = df["stage"].map({"resampler": 0, "finetune": 1})
    return df.loc[keys.sort_values(list(keys.columns), kind="stable").index]


def ci95_halfwidth(values: Sequence[float] | pd.Series) -> float:
    """Half-width of the Student-t 95% CI of the mean; NaN for fewer than 2 finite values."""
    x = np.asarray(pd.to_numeric(pd.Series(values), errors="coerce").dropna(), dtype=float)
    if x.size < 2:
        return math.nan
    return float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


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


def headline_table(df: pd.DataFrame, stage: str = "finetune") -> pd.DataFrame:
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


def format_mean_ci(mean: float, ci: float, digits: int = 3) -> str:
    """``mean ± ci`` (or just the mean when there is no CI)."""
    text = format_value(mean, digits)
    if not (isinstance(ci, float) and math.isnan(ci)) and text != "–":
        text += f" ± {format_value(ci, digits)}"
    return text


def failed_table(df: pd.DataFrame) -> pd.DataFrame:
    return ordered(df[df["status"] == "failed"])[["cell_id", "stage", "error"]].reset_index(drop=True)


def provenance_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell x stage that recorded something (failed stages without records are left out)."""
    has_record = df["config_hash"].notna() | df["device"].notna()
    return ordered(df[has_record])[list(PROVENANCE_COLUMNS)].reset_index(drop=True)
