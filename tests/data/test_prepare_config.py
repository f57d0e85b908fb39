"""The `source:` block, the prepare-data CLI and the library agree on keys, flags and defaults."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from panobench import cli
from panobench import matrix as pm
from panobench.data import prepare
from panobench.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def prepare_parser() -> argparse.ArgumentParser:
    subparsers = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices["prepare-data"]


def source_schema() -> dict:
    return yaml.safe_load((REPO / "config" / "schema.yaml").read_text())["properties"]["source"]


def test_prepared_outputs_are_the_run_data_csvs() -> None:
    data = {"root": "data/q", "train_csv": "data/q/train.csv", "valid_csv": "data/q/./valid.csv",
            "test_csv": "data/q/test.csv"}
    assert pm.prepared_data_outputs(data) == {
        "out": "data/q", "csvs": ["data/q/train.csv", "data/q/./valid.csv", "data/q/test.csv"],
        "manifest": "data/q/manifest.json", "dropped": "data/q/dropped.csv"}
    with pytest.raises(ConfigError, match=r"run.data.test_csv is 'data/other/test.csv'.*'data/q/test.csv'"):
        pm.prepared_data_outputs({**data, "test_csv": "data/other/test.csv"})
    assert pm.prepared_data_outputs(data)["manifest"].endswith(prepare.MANIFEST)
    assert pm.prepared_data_outputs(data)["dropped"].endswith(prepare.DROPPED)


def test_every_optional_source_key_is_a_cli_flag() -> None:
    schema = source_schema()
    optional = set(schema["properties"]) - set(schema["required"])
    assert set(pm.PREPARE_DATA_FLAGS) == optional
    flags = {flag for action in prepare_parser()._actions for flag in action.option_strings}
    assert set(pm.PREPARE_DATA_FLAGS.values()) <= flags
    assert pm.prepare_data_options({"train": "t.csv", "workers": 4, "on_missing": "drop"}) == \
        ["--on-missing", "drop", "--workers", "4"]
    assert pm.published_csv_inputs({"train": "a.csv", "valid": "HTTPS://x.org/v.csv", "test": "c.csv"}) == \
        ["a.csv", "c.csv"]


def test_defaults_agree_between_schema_cli_and_library() -> None:
    """The CLI spells its defaults out (so `panobench --help` imports no PIL/torch); they must not drift."""
    defaults = {a.dest: a.default for a in prepare_parser()._actions}
    library = {f.name: f.default for cls in (prepare.FetchPolicy, prepare.ImagePolicy) for f in dataclasses.fields(cls)}
    assert {k: defaults[k] for k in ("workers", "retries", "min_width", "min_height")} == \
        {k: library[k] for k in ("workers", "retries", "min_width", "min_height")}
    assert (defaults["timeout"], defaults["backoff"]) == (library["timeout_s"], library["backoff_s"])
    assert defaults["on_missing"] == "fail"
    for key, flag in pm.PREPARE_DATA_FLAGS.items():
        stated = re.search(r"\(default: (\w+)\)", source_schema()["properties"][key]["description"])
        dest = flag.removeprefix("--").replace("-", "_")
        assert stated and stated.group(1) == str(defaults[dest]).removesuffix(".0"), key
