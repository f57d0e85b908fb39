"""Whole-matrix checks the report shows as warnings: unequal visual-token budgets, more than one data fingerprint.

Both read only ``results.csv``. A comparison between arms is only about the arm when the arms feed the LM the same
number of visual tokens per view and saw the same data (SPEC §5b); these checks say when that does not hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from panobench.reporting.tables import ok_rows, resampler_order
from panobench.stages import FINAL_STAGE

SHORT_FINGERPRINT = 12   # hex digits shown in tables; results.csv keeps the full SHA-256


@dataclass(frozen=True)
class BudgetWarning:
    """Arms (resamplers) whose visual-token budgets differ: ``arms`` = (resampler, tokens) in report order."""

    basis: str                             # what was compared, in words
    arms: list[tuple[str, str]] = field(default_factory=list)

    @property
    def message(self) -> str:
        listed = "; ".join(f"{arm}: {tokens}" for arm, tokens in self.arms)
        return (f"Unequal visual-token budgets: the arms differ in {self.basis} ({listed}). Differences between "
                "these resamplers mix the resampler with the number of visual tokens the LM sees.")


def _numeric(df: pd.DataFrame, column: str) -> pd.Series:
    """The column as numbers; all NaN when the table (an older results.csv) does not have it."""
    if column not in df:
        return pd.Series(float("nan"), index=df.index)
    return pd.to_numeric(df[column], errors="coerce")


def _number(value: float) -> str:
    return f"{value:g}"


def token_budget_warning(df: pd.DataFrame) -> BudgetWarning | None:
    """None when every arm has one and the same budget; else which arms have which.

    Compared on the successful finetune rows (all successful rows when there are none): ``resampled_tokens_per_view``
    when recorded; for older records without it, ``visual_tokens_per_sample`` at each overlap.
    """
    data = ok_rows(df, FINAL_STAGE)
    if data.empty:
        data = ok_rows(df)
    order = resampler_order(data["resampler"])
    per_view = _numeric(data, "resampled_tokens_per_view")
    if per_view.notna().any():
        by_arm = {r: sorted(set(per_view[data["resampler"] == r].dropna())) for r in order}
        by_arm = {r: v for r, v in by_arm.items() if v}
        if len({tuple(v) for v in by_arm.values()}) > 1 or any(len(v) > 1 for v in by_arm.values()):
            return BudgetWarning("visual tokens per view",
                                 [(r, ", ".join(_number(x) for x in v)) for r, v in by_arm.items()])
        return None
    per_sample = _numeric(data, "visual_tokens_per_sample")
    if per_sample.isna().all():
        return None
    for overlap in sorted(data["overlap"].dropna().unique()):
        at = data["overlap"] == overlap
        by_arm = {r: sorted(set(per_sample[at & (data["resampler"] == r)].dropna())) for r in order}
        by_arm = {r: v for r, v in by_arm.items() if v}
        if len({tuple(v) for v in by_arm.values()}) > 1:
            return BudgetWarning(f"visual tokens per sample at overlap {overlap:.2f}",
                                 [(r, ", ".join(_number(x) for x in v)) for r, v in by_arm.items()])
    return None


def short_fingerprint(value: object) -> str:
    """The first hex digits of a fingerprint (or "–")."""
    if not isinstance(value, str) or not value:
        return "–"
    return value[:SHORT_FINGERPRINT]


@dataclass(frozen=True)
class FingerprintSummary:
    """The data fingerprints recorded by the successful training and evaluation jobs, with their job counts."""

    counts: dict[str, int]

    @property
    def shared(self) -> bool:
        return len(self.counts) == 1

    @property
    def text(self) -> str:
        if not self.counts:
            return "not recorded (records older than the fingerprint)"
        if self.shared:
            (fp,) = self.counts
            return f"{fp} (all {self.counts[fp]} records with a fingerprint)"
        return "MISMATCH: " + "; ".join(f"{short_fingerprint(fp)}… in {n} records" for fp, n in self.counts.items())


def fingerprints(df: pd.DataFrame, recipes: pd.DataFrame | None = None) -> FingerprintSummary:
    """Count the distinct fingerprints over training (``data_fingerprint``) and evaluation (``eval_data_fingerprint``)
    records of the successful rows, plus the stage-1 recipes'."""
    values: list[str] = []
    data = ok_rows(df)
    for column in ("data_fingerprint", "eval_data_fingerprint"):
        if column in data:
            values += [v for v in data[column] if isinstance(v, str) and v]
    if recipes is not None and "data_fingerprint" in recipes:
        values += [v for v in recipes[recipes["status"] == "ok"]["data_fingerprint"] if isinstance(v, str) and v]
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return FingerprintSummary(dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))))
