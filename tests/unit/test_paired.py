"""The paired-comparison statistics against hand-computed values (reporting/paired.py, reporting/stats.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from panobench.reporting.paired import ONE_SEED, paired_differences, reference_differences
from panobench.reporting.plots import _errorbar
from panobench.reporting.stats import t_errorbar, t_interval

T_975_2 = 4.302653          # Student t quantile 0.975 with 2 degrees of freedom (tables)
T_975_1 = 12.706205         # ... with 1 degree of freedom


def _row(resampler: str, overlap: float, seed: int, cider: float, *, stage: str = "finetune", status: str = "ok",
         vision: str = "pretrained", blind: float = math.nan, baseline: float = math.nan) -> dict:
    return {"cell_id": f"ov{overlap:.2f}_{resampler}_{vision}_seed{seed}", "overlap": overlap, "fov": 90.0,
            "resampler": resampler, "vision_checkpoint": vision, "seed": seed, "stage": stage, "status": status,
            "CIDEr": cider, "Bleu_4": math.nan, "METEOR": math.nan, "ROUGE_L": math.nan, "SPICE": math.nan,
            "blind_CIDEr": blind, "delta_blind_CIDEr": cider - blind, "baseline_CIDEr": baseline,
            "delta_CIDEr": cider - baseline}


def _matrix(diffs_by_seed: dict[int, tuple[float, float]]) -> list[dict]:
    """mlp vs qformer at overlaps 0 and 0.5; qformer = mlp + the given difference per (seed, overlap)."""
    rows = []
    for seed, (d0, d5) in diffs_by_seed.items():
        for overlap, d in ((0.0, d0), (0.5, d5)):
            base = 1.0 + 0.1 * seed + overlap
            rows += [_row("mlp", overlap, seed, base), _row("qformer", overlap, seed, base + d)]
    return rows


def _summary(rows: list[dict], knob: str = "resampler") -> pd.Series:
    summary, _ = paired_differences(pd.DataFrame(rows))
    found = summary[(summary["knob"] == knob) & (summary["metric"] == "CIDEr")]
    assert len(found) == 1
    return found.iloc[0]


def test_three_seeds_no_detectable_difference():
    # per-seed differences averaged over the two overlaps: 0.10, 0.20, 0.30
    r = _summary(_matrix({0: (0.05, 0.15), 1: (0.2, 0.2), 2: (0.25, 0.35)}))
    half = T_975_2 * 0.1 / math.sqrt(3)                       # sd of (0.1, 0.2, 0.3) = 0.1
    assert (r["level_a"], r["level_b"], r["n"], r["n_pairs"]) == ("mlp", "qformer", 3, 6)
    assert r["mean"] == pytest.approx(0.2)
    assert r["low"] == pytest.approx(0.2 - half, abs=1e-6) and r["high"] == pytest.approx(0.2 + half, abs=1e-6)
    assert r["low"] == pytest.approx(-0.048414, abs=1e-6)
    assert r["verdict"] == "no detectable difference at n=3"


def test_three_seeds_b_better_and_a_better():
    r = _summary(_matrix({0: (0.3, 0.3), 1: (0.4, 0.4), 2: (0.5, 0.5)}))
    assert r["mean"] == pytest.approx(0.4) and r["low"] == pytest.approx(0.4 - 0.248414, abs=1e-6)
    assert r["verdict"] == "qformer better"
    r = _summary(_matrix({0: (-0.3, -0.3), 1: (-0.4, -0.4), 2: (-0.5, -0.5)}))
    assert r["high"] == pytest.approx(-0.4 + 0.248414, abs=1e-6) and r["verdict"] == "mlp better"


def test_pairing_ignores_unmatched_failed_and_stage2_rows():
    rows = _matrix({0: (0.05, 0.15), 1: (0.2, 0.2), 2: (0.25, 0.35)})
    rows += [
        _row("qformer", 0.0, 3, 9.0),                          # seed 3 has no mlp partner
        _row("mlp", 0.5, 4, 1.0), _row("qformer", 0.5, 4, 9.0, status="failed"),   # failed partner
        _row("mlp", 0.0, 5, 1.0, stage="resampler"), _row("qformer", 0.0, 5, 9.0, stage="resampler"),
        _row("mlp", 0.0, 6, 1.0), _row("qformer", 0.0, 6, math.nan),              # metric missing
    ]
    r = _summary(rows)
    assert (r["n"], r["n_pairs"], r["verdict"]) == (3, 6, "no detectable difference at n=3")
    assert r["mean"] == pytest.approx(0.2)


def test_one_seed_is_not_testable():
    r = _summary(_matrix({0: (0.3, 0.5)}))
    assert r["n"] == 1 and r["mean"] == pytest.approx(0.4)
    assert math.isnan(r["low"]) and math.isnan(r["high"]) and r["verdict"] == ONE_SEED


def test_two_seeds_interval_and_breakdown_per_setting():
    # overlap 0: differences 0.1, 0.3 over seeds; overlap 0.5: 0.2, 0.2
    _, breakdown = paired_differences(pd.DataFrame(_matrix({0: (0.1, 0.2), 1: (0.3, 0.2)})))
    rows = breakdown[(breakdown["knob"] == "resampler") & (breakdown["metric"] == "CIDEr")].set_index("setting")
    at0 = rows.loc["pretrained · ov 0.00"]
    half = T_975_1 * (0.2 / math.sqrt(2)) / math.sqrt(2)   # sd of (0.1, 0.3) = 0.2/sqrt(2)
    assert at0["n"] == 2 and at0["mean"] == pytest.approx(0.2)
    assert (at0["low"], at0["high"]) == (pytest.approx(0.2 - half, abs=1e-6), pytest.approx(0.2 + half, abs=1e-6))
    at5 = rows.loc["pretrained · ov 0.50"]
    # two equal differences: zero spread, an interval of width 0 strictly above 0
    assert at5["low"] == pytest.approx(0.2) and at5["verdict"] == "qformer better"


def test_overlap_knob_pairs_across_resamplers_and_all_level_pairs():
    rows = []
    for seed, d in ((0, 0.1), (1, 0.2), (2, 0.3)):
        for res in ("mlp", "bimamba", "qformer", "perceiver"):
            rows += [_row(res, 0.0, seed, 1.0), _row(res, 0.5, seed, 1.0 + d)]
    summary, _ = paired_differences(pd.DataFrame(rows))
    overlap = summary[(summary["knob"] == "overlap")].iloc[0]
    assert (overlap["level_a"], overlap["level_b"], overlap["n"], overlap["n_pairs"]) == (
        "overlap 0.00", "overlap 0.50", 3, 12)
    assert overlap["mean"] == pytest.approx(0.2)
    pairs = summary[summary["knob"] == "resampler"][["level_a", "level_b"]].apply(tuple, axis=1).tolist()
    assert pairs == [("mlp", "bimamba"), ("mlp", "qformer"), ("mlp", "perceiver"), ("bimamba", "qformer"),
                     ("bimamba", "perceiver"), ("qformer", "perceiver")]


def test_trained_minus_blind_and_baseline():
    rows = [_row("mlp", 0.0, seed, cider, blind=blind, baseline=0.0)
            for seed, cider, blind in ((0, 1.0, 0.9), (1, 1.2, 0.9), (2, 1.1, 1.1))]
    refs = reference_differences(pd.DataFrame(rows))
    blind = refs[(refs["reference"] == "blind") & (refs["setting"] == "all cells")].iloc[0]
    d = np.array([0.1, 0.3, 0.0])                            # trained − blind per seed
    half = T_975_2 * d.std(ddof=1) / math.sqrt(3)
    assert blind["n"] == 3 and blind["mean"] == pytest.approx(d.mean())
    assert blind["low"] == pytest.approx(d.mean() - half, abs=1e-6)
    assert blind["verdict"] == "no detectable difference at n=3"
    assert blind["trained"] == pytest.approx(1.1) and blind["reference_value"] == pytest.approx(0.9666667)
    baseline = refs[(refs["reference"] == "baseline") & (refs["setting"] == "all cells")].iloc[0]
    assert baseline["verdict"] == "training helps" and baseline["mean"] == pytest.approx(1.1)


def test_figures_use_the_table_interval():
    values = [0.1, 0.2, 0.3]
    ci = t_interval(values)
    assert t_errorbar(np.array(values)) == (ci.low, ci.high)
    assert ci.halfwidth == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), abs=1e-6)
    assert t_interval([1.0]).n == 1 and math.isnan(t_interval([1.0]).low)
    assert t_interval([math.nan, 2.0, None]).n == 1
    two_seeds = pd.DataFrame([_row("mlp", 0.0, s, 1.0) for s in (0, 1)])
    assert _errorbar(two_seeds) is t_errorbar and _errorbar(two_seeds.iloc[:1]) is None
