"""Whole-matrix warnings in the report: unequal visual-token budgets and more than one data fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from fixtures_records import FINGERPRINT, write_records

from panobench.reporting.aggregate import aggregate
from panobench.reporting.checks import fingerprints, token_budget_warning
from panobench.reporting.html import build_report


def _build(root: Path, **kwargs) -> tuple[pd.DataFrame, str]:
    manifest = write_records(root, overlaps=(0.0, 0.5), resamplers=("mlp", "qformer", "perceiver"), seeds=(0,),
                             **kwargs)
    out = root / "rep" / "results.csv"
    df = aggregate(manifest, out, root=root)
    return df, build_report(out, manifest, out.parent, root=root).read_text()


def test_equal_budgets_no_warning_and_tokens_on_every_row(tmp_path):
    df, html = _build(tmp_path)
    assert token_budget_warning(df) is None
    assert 'id="budget-alert"' not in html
    headline = html.split('id="headline"')[1].split('id="paired"')[0]
    rows = headline.split("<tbody>")[1].split("</tbody>")[0].count("<tr>")
    assert rows == 6 and headline.count("<td>16</td>") == rows      # tokens / view on every row
    assert headline.count("<td>80</td>") + headline.count("<td>144</td>") == rows   # 16 x 5 or 9 views


def test_unequal_budgets_warn_naming_the_arms(tmp_path):
    df, html = _build(tmp_path, tokens_per_view={"qformer": 32})
    warning = token_budget_warning(df)
    assert warning is not None and warning.basis == "visual tokens per view"
    assert warning.arms == [("mlp", "16"), ("qformer", "32"), ("perceiver", "16")]
    alert = html.split('id="budget-alert"')[1].split("</div>")[0]
    assert "mlp: 16" in alert and "qformer: 32" in alert and "perceiver: 16" in alert
    assert html.index('id="budget-alert"') < html.index('id="summary"')          # at the top
    assert "288" in html.split('id="headline"')[1].split('id="paired"')[0]       # 32 x 9 views shown


def test_budget_check_without_per_view_record_compares_tokens_per_sample(tmp_path):
    df, _ = _build(tmp_path, tokens_per_view={"perceiver": 8})
    old = df.assign(resampled_tokens_per_view=float("nan"))   # records from before the per-view field
    warning = token_budget_warning(old)
    assert warning is not None and warning.basis == "visual tokens per sample at overlap 0.00"
    assert ("perceiver", "40") in warning.arms and ("mlp", "80") in warning.arms
    assert token_budget_warning(df.assign(resampled_tokens_per_view=float("nan"),
                                          visual_tokens_per_sample=df["num_views"] * 16)) is None


def test_one_fingerprint_is_shared_and_a_second_one_warns(tmp_path):
    df, html = _build(tmp_path)
    summary = fingerprints(df)
    assert summary.shared and list(summary.counts) == [FINGERPRINT]
    assert 'id="data-alert"' not in html and f"{FINGERPRINT} (all" in html

    root = tmp_path / "mixed"
    manifest = write_records(root, overlaps=(0.0, 0.5), resamplers=("mlp",), seeds=(0,))
    man = json.loads(manifest.read_text())
    path = root / man["cells"][1]["stages"]["finetune"]["measurements"]
    record = json.loads(path.read_text())
    record["data"]["fingerprint"] = "cd" * 32
    path.write_text(json.dumps(record))
    out = root / "rep" / "results.csv"
    mixed = aggregate(manifest, out, root=root)
    # 4 training records (one changed) + 4 evaluation records (resampler and finetune of both cells)
    assert fingerprints(mixed).counts == {FINGERPRINT: 7, "cd" * 32: 1}
    html = build_report(out, manifest, out.parent, root=root).read_text()
    alert = html.split('id="data-alert"')[1].split("</div>")[0]
    assert "2 data fingerprints" in alert and "cdcdcdcdcdcd…" in alert
