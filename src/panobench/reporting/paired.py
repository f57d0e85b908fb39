"""Paired comparisons: what one knob changes, paired by seed, with the one interval method the report uses.

The method (the report and docs/records.md state it in these words):

- Rows: stage ``finetune``, ``status == ok``, the metric finite.
- A knob K (overlap, resampler, vision checkpoint) and two of its levels A, B (A before B in the report's order:
  overlaps ascending, resamplers in the fixed order, vision checkpoints in matrix order). A *pair* is an A row and
  a B row that agree on every other knob, the seed included.
- Per seed s: d_s = the mean of B − A over that seed's pairs (that is, over the matched settings of the other
  knobs). The seed is the unit of replication: n = the number of seeds with at least one pair.
- Estimate: the mean of the d_s; 95 % interval: mean ± t_{0.975, n−1} · sd(d_s) / √n (Student t, sd with n − 1).
- Verdict: interval entirely above 0 → "B better"; entirely below 0 → "A better"; otherwise "no detectable
  difference at n=<n>". n = 1 → no interval, "one seed: not testable".

Trained vs blind and trained vs untrained baseline are the same analysis of the within-cell differences
``delta_blind_<metric>`` and ``delta_<metric>``. Every interval in the report's tables and figures is
:func:`panobench.reporting.stats.t_interval` (the figures pass ``t_errorbar`` to seaborn).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import pandas as pd

from panobench.reporting.stats import Interval, t_interval
from panobench.reporting.tables import ok_rows, ordered, resampler_order
from panobench.stages import FINAL_STAGE

KNOBS = ("overlap", "resampler", "vision_checkpoint")
KNOB_LABELS = {"overlap": "overlap", "resampler": "resampler", "vision_checkpoint": "vision checkpoint"}
# Pairs must agree on all of these except the knob under test.
MATCH_COLUMNS = ("overlap", "fov", "resampler", "vision_checkpoint", "seed")
# (column, label); SPICE only takes part when some row has it (it needs CoreNLP jars).
PAIRED_METRICS: tuple[tuple[str, str], ...] = (("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"),
                                               ("ROUGE_L", "ROUGE-L"), ("SPICE", "SPICE"))
# reference -> (column prefix of the within-cell difference, name, verdict when trained is higher / lower)
REFERENCES: dict[str, tuple[str, str, str, str]] = {
    "baseline": ("delta_", "trained − untrained", "training helps", "untrained scores higher"),
    "blind": ("delta_blind_", "trained − blind", "image helps", "grey image scores higher"),
}
ONE_SEED = "one seed: not testable"
PAIRED_COLUMNS = ("knob", "level_a", "level_b", "metric", "n", "n_pairs", "mean", "low", "high", "verdict")
BREAKDOWN_COLUMNS = ("knob", "level_a", "level_b", "setting", "metric", "n", "mean", "low", "high", "verdict")
REFERENCE_COLUMNS = ("reference", "setting", "vision_checkpoint", "resampler", "overlap", "metric", "n",
                     "trained", "reference_value", "mean", "low", "high", "verdict")


def verdict(ci: Interval, a_better: str, b_better: str) -> str:
    """The plain reading of an interval of B − A (see the module docstring)."""
    if ci.n == 0:
        return "no matched pairs"
    if ci.n < 2:
        return ONE_SEED
    if ci.low > 0:
        return b_better
    if ci.high < 0:
        return a_better
    return f"no detectable difference at n={ci.n}"


def verdict_kind(verdict_text: str, b_better: str, a_better: str) -> str:
    """What a verdict says, for colouring it: "b" (B better), "a" (A better), "untestable" (one seed) or "none"."""
    if verdict_text == b_better:
        return "b"
    if verdict_text == a_better:
        return "a"
    return "untestable" if verdict_text == ONE_SEED else "none"


def level_text(knob: str, level: object) -> str:
    """How a level is written in tables and verdicts ("overlap 0.50", "qformer", "vicreg-ov0.5")."""
    if knob == "overlap":
        return f"overlap {float(level):.2f}"
    return str(level)


def levels(df: pd.DataFrame, knob: str) -> list:
    """The knob's levels present in ``df``, in the report's order."""
    if knob == "overlap":
        return sorted(pd.unique(df["overlap"].dropna()))
    if knob == "resampler":
        return resampler_order(df["resampler"])
    return list(pd.unique(ordered(df)["vision_checkpoint"].dropna()))


def metrics_present(df: pd.DataFrame) -> list[tuple[str, str]]:
    """The paired metrics with at least one finite value among ``df``'s rows."""
    return [(c, label) for c, label in PAIRED_METRICS if c in df and pd.to_numeric(df[c], errors="coerce").notna().any()]


def _finetune(df: pd.DataFrame) -> pd.DataFrame:
    # A copy in one block: a results table read column by column is fragmented, and each .assign() on it warns.
    return ok_rows(df, FINAL_STAGE).copy()


def _pairs(data: pd.DataFrame, knob: str, a: object, b: object, metric: str) -> pd.DataFrame:
    """Matched (A, B) rows of one metric: index = the other knobs incl. seed, columns ``a``, ``b``, ``diff``."""
    others = [c for c in MATCH_COLUMNS if c != knob]
    side = {}
    for name, level in (("a", a), ("b", b)):
        rows = data[data[knob] == level]
        side[name] = pd.to_numeric(rows[metric], errors="coerce").set_axis(pd.MultiIndex.from_frame(rows[others]))
    pairs = pd.concat(side, axis=1, join="inner").dropna()
    pairs["diff"] = pairs["b"] - pairs["a"]
    return pairs


def setting_text(key: tuple, names: Sequence[str]) -> str:
    """A setting of some knobs, compactly: "pretrained · mlp · ov 0.50" (vision checkpoint, resampler, overlap)."""
    values = dict(zip(names, key, strict=True))
    parts = [str(values["vision_checkpoint"])] if "vision_checkpoint" in values else []
    parts += [str(values["resampler"])] if "resampler" in values else []
    parts += [f"ov {float(values['overlap']):.2f}"] if "overlap" in values else []
    return " · ".join(parts) or "–"   # fov is left out: one per matrix, it only takes part in matching


def paired_differences(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, breakdown) of every knob's level pairs for every paired metric present.

    summary: one row per (knob, A, B, metric) with n seeds, n_pairs, mean/low/high of B − A and the verdict.
    breakdown: the same per setting of the other knobs (n = seeds of that setting).
    """
    data = _finetune(df)
    summary, breakdown = [], []
    for knob in KNOBS:
        for a, b in itertools.combinations(levels(data, knob), 2):
            ta, tb = level_text(knob, a), level_text(knob, b)
            for metric, _ in metrics_present(data):
                pairs = _pairs(data, knob, a, b, metric)
                if pairs.empty:
                    continue
                per_seed = pairs["diff"].groupby(level="seed").mean()
                ci = t_interval(per_seed)
                summary.append({"knob": knob, "level_a": ta, "level_b": tb, "metric": metric, "n": ci.n,
                                "n_pairs": len(pairs), "mean": ci.mean, "low": ci.low, "high": ci.high,
                                "verdict": verdict(ci, f"{ta} better", f"{tb} better")})
                setting_names = [n for n in pairs.index.names if n != "seed"]
                for key, group in pairs["diff"].groupby(level=setting_names, sort=False):
                    key = key if isinstance(key, tuple) else (key,)
                    ci = t_interval(group)
                    breakdown.append({"knob": knob, "level_a": ta, "level_b": tb,
                                      "setting": setting_text(key, setting_names), "metric": metric, "n": ci.n,
                                      "mean": ci.mean, "low": ci.low, "high": ci.high,
                                      "verdict": verdict(ci, f"{ta} better", f"{tb} better")})
    return (pd.DataFrame(summary, columns=list(PAIRED_COLUMNS)),
            pd.DataFrame(breakdown, columns=list(BREAKDOWN_COLUMNS)))


def reference_differences(df: pd.DataFrame) -> pd.DataFrame:
    """Trained − reference (untrained baseline, blind) per metric: over all cells, then per setting.

    "all cells": d_s = the mean over seed s's cells of the within-cell difference, interval over seeds (as for a
    knob). Per setting (vision checkpoint × resampler × overlap): the interval over that setting's seeds.
    """
    data = _finetune(df)
    rows = []
    settings = ["vision_checkpoint", "resampler", "overlap"]
    for reference, (prefix, _, helps, hurts) in REFERENCES.items():
        for metric, _ in metrics_present(data):
            column = f"{prefix}{metric}"
            ref_column = f"{reference}_{metric}"
            if column not in data or ref_column not in data:
                continue
            sub = data.assign(_d=pd.to_numeric(data[column], errors="coerce")).dropna(subset=["_d"])
            if sub.empty:
                continue
            ci = t_interval(sub.groupby("seed")["_d"].mean())
            rows.append({"reference": reference, "setting": "all cells", "vision_checkpoint": None,
                         "resampler": None, "overlap": math.nan, "metric": metric, "n": ci.n,
                         "trained": float(sub[metric].mean()), "reference_value": float(sub[ref_column].mean()),
                         "mean": ci.mean, "low": ci.low, "high": ci.high, "verdict": verdict(ci, hurts, helps)})
            for key, group in ordered(sub).groupby(settings, sort=False):
                ci = t_interval(group.groupby("seed")["_d"].mean())
                rows.append({"reference": reference, "setting": setting_text(key, settings),
                             **dict(zip(settings, key, strict=True)), "metric": metric, "n": ci.n,
                             "trained": float(group[metric].mean()),
                             "reference_value": float(group[ref_column].mean()),
                             "mean": ci.mean, "low": ci.low, "high": ci.high, "verdict": verdict(ci, hurts, helps)})
    return pd.DataFrame(rows, columns=list(REFERENCE_COLUMNS))


def max_seeds(df: pd.DataFrame) -> int:
    """The most seeds any paired comparison of ``df`` can have (seeds among successful finetune rows)."""
    data = _finetune(df)
    return int(data["seed"].nunique()) if not data.empty else 0
