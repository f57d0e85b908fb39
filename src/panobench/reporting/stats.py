"""The report's one interval method: the Student-t 95 % interval of a mean over seeds, for tables and figures alike.

With 2-3 seeds a bootstrap interval (seaborn's default) collapses towards the range of the values and understates
the uncertainty; the t interval is the honest one for tiny n. Fewer than 2 values: no interval (NaN bounds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
METHOD = ("95 % interval = mean ± t(0.975, n−1) · sd / √n over seeds (Student t, sample sd); "
          "no interval with fewer than 2 seeds")


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values and its Student-t interval (NaN bounds for n < 2)."""

    n: int
    mean: float
    low: float
    high: float

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2


def t_interval(values: Sequence[float] | pd.Series | np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Mean ± t_{(1+c)/2, n−1} · sd / √n over the finite values of ``values``."""
    x = pd.to_numeric(pd.Series(np.asarray(values, dtype=object).ravel()), errors="coerce").to_numpy(dtype=float)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return Interval(0, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(1, mean, math.nan, math.nan)
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(int(x.size), mean, mean - half, mean + half)


def ci95_halfwidth(values: Sequence[float] | pd.Series) -> float:
    """Half-width of :func:`t_interval`; NaN for fewer than 2 finite values."""
    return t_interval(values).halfwidth


def t_errorbar(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """seaborn ``errorbar=`` callable: the same interval the tables show."""
    ci = t_interval(values)
    return ci.low, ci.high
