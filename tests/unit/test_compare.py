"""`panobench compare`: the reproduction check between two results.csv files (reporting/compare.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from fixtures_records import write_records

from panobench.cli import main as cli_main
from panobench.reporting.aggregate import aggregate

CELL = "ov0.50_fov90_qformer_vis-pretrained_seed1"


def _run(root: Path) -> Path:
    """One fabricated run of the same config (deterministic records) aggregated into root/results.csv."""
    manifest = write_records(root, overlaps=(0.0, 0.5), resamplers=("mlp", "qformer"), seeds=(0, 1))
    out = root / "reports" / "results.csv"
    aggregate(manifest, out, root=root)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _run(tmp_path_factory.mktemp("a")), _run(tmp_path_factory.mktemp("b"))


def _changed(src: Path, dst: Path, edit) -> Path:
    df = pd.read_csv(src)
    df = edit(df)
    df.to_csv(dst, index=False)
    return dst


def test_two_runs_of_one_config_agree(runs, capsys):
    assert cli_main(["compare", str(runs[0]), str(runs[1])]) == 0
    out = capsys.readouterr().out
    assert "agree: 16 rows" in out and "difference" not in out


def test_metric_beyond_tolerance_is_named(runs, tmp_path, capsys):
    def bump(df: pd.DataFrame) -> pd.DataFrame:
        at = (df["cell_id"] == CELL) & (df["stage"] == "finetune")
        df.loc[at, "CIDEr"] += 0.01
        df.loc[at, "blind_METEOR"] += 0.001            # within the default tolerance 0.002: not a difference
        return df

    changed = _changed(runs[1], tmp_path / "changed.csv", bump)
    assert cli_main(["compare", str(runs[0]), str(changed)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    diffs = [ln for ln in lines if ln.startswith(CELL)]
    assert len(diffs) == 1 and diffs[0].startswith(f"{CELL} finetune CIDEr: ") and "> 0.002" in diffs[0]
    assert lines[-1].startswith("1 difference(s)")
    # a looser tolerance accepts the change
    assert cli_main(["compare", str(runs[0]), str(changed), "--tolerance", "0.05"]) == 0


def test_missing_row_and_missing_value_are_differences(runs, tmp_path, capsys):
    def drop(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[(df["cell_id"] == "ov0.00_fov90_mlp_vis-pretrained_seed0") & (df["stage"] == "finetune"),
               "baseline_CIDEr"] = float("nan")
        return df[~((df["cell_id"] == CELL) & (df["stage"] == "resampler"))]

    changed = _changed(runs[1], tmp_path / "dropped.csv", drop)
    assert cli_main(["compare", str(runs[0]), str(changed)]) == 1
    out = capsys.readouterr().out
    assert f"{CELL} resampler: only in {runs[0]}" in out
    assert "ov0.00_fov90_mlp_vis-pretrained_seed0 finetune baseline_CIDEr:" in out and "missing on one side" in out


def test_status_and_data_fingerprint_must_match(runs, tmp_path, capsys):
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[df["cell_id"] == CELL, "data_fingerprint"] = "cd" * 32
        return df

    changed = _changed(runs[1], tmp_path / "otherdata.csv", edit)
    assert cli_main(["compare", str(runs[0]), str(changed)]) == 1
    assert f"{CELL} finetune data_fingerprint: {'ab' * 32} vs {'cd' * 32}" in capsys.readouterr().out


def test_bad_input_exits_2_naming_the_file(runs, tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert cli_main(["compare", str(runs[0]), str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    no_key = _changed(runs[1], tmp_path / "nokey.csv", lambda df: df.drop(columns=["stage"]))
    assert cli_main(["compare", str(no_key), str(runs[0])]) == 2
    err = capsys.readouterr().err
    assert str(no_key) in err and "'stage'" in err
    no_metrics = _changed(runs[1], tmp_path / "nometrics.csv", lambda df: df[["cell_id", "stage", "status"]])
    assert cli_main(["compare", str(runs[0]), str(no_metrics)]) == 2
    assert str(no_metrics) in capsys.readouterr().err
    doubled = _changed(runs[1], tmp_path / "doubled.csv", lambda df: pd.concat([df, df.iloc[:1]]))
    assert cli_main(["compare", str(runs[0]), str(doubled)]) == 2
    assert "appears 2 times" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert cli_main(["compare", str(empty), str(runs[0])]) == 2
    assert cli_main(["compare", str(runs[0]), str(runs[1]), "--tolerance", "-1"]) == 2
