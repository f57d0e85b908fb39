"""The resolved run configs are built once, when the DAG is built, and written only where their content changed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import yaml

from panobench import matrix as pm
from panobench.config import load_run_config
from panobench.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workflow(tmp_path, monkeypatch) -> dict:
    """The embedded default cut to 4 cells (two resamplers, two seeds, no stage-1 recipe), run from an empty dir."""
    wf = pm.load_workflow([], ROOT)
    wf["matrix"] = {**wf["matrix"], "overlaps": [0.5], "resamplers": ["mlp", "qformer"],
                    "vision_checkpoints": [{"name": "pretrained"}]}
    monkeypatch.chdir(tmp_path)
    return wf


def _mtimes(wf: dict) -> dict[str, int]:
    files = [pm.workflow_path(wf), *(pm.config_path(wf, e) for e in pm.experiments(wf))]
    return {f: os.stat(f).st_mtime_ns for f in files}


def _age(paths) -> None:
    """Set the files' mtimes an hour back, so that a rewrite (even within the clock's resolution) shows."""
    for path in paths:
        stamp = os.stat(path).st_mtime_ns - 3600 * 10**9
        os.utime(path, ns=(stamp, stamp))


def test_writes_the_workflow_and_every_cell_config_the_jobs_read(workflow):
    resolved = pm.write_resolved(workflow)
    assert sorted(resolved) == sorted(c.cell_id for c in pm.expand_cells(workflow))
    for experiment, run in resolved.items():
        path = Path(pm.config_path(workflow, experiment))
        assert yaml.safe_load(path.read_text()) == run
        assert load_run_config(path).cell_id == experiment          # what `panobench train --config` reads
    assert pm.load_workflow_file(pm.workflow_path(workflow))["matrix"] == workflow["matrix"]
    assert not [p for p in Path("results").rglob("*") if p.name.startswith(".")]   # no temp files left


def test_unchanged_files_keep_their_mtime_and_a_change_rewrites_exactly_its_cells(workflow):
    pm.write_resolved(workflow)
    _age(_mtimes(workflow))
    before = _mtimes(workflow)
    pm.write_resolved(workflow)
    assert _mtimes(workflow) == before                              # nothing changed: nothing rewritten

    # Listing the same params in another order is no change either (the files are written in one key order).
    workflow["resampler_params"] = {"qformer": {"num_heads": 4, "depth": 1}, **workflow["resampler_params"]}
    pm.write_resolved(workflow)
    assert _mtimes(workflow) == before

    workflow["resampler_params"] = {**workflow["resampler_params"], "qformer": {"depth": 2, "num_heads": 4}}
    pm.write_resolved(workflow)
    after = _mtimes(workflow)
    changed = {Path(f).stem for f in after if after[f] != before[f]}
    assert changed == {"workflow"} | {c.cell_id for c in pm.expand_cells(workflow) if c.resampler == "qformer"}


def test_a_bad_matrix_writes_nothing(workflow):
    workflow["run"] = {**workflow["run"], "bogus_run_key": 1}
    with pytest.raises(ConfigError, match="bogus_run_key"):
        pm.write_resolved(workflow)
    assert not Path("results").exists()


def test_write_false_only_resolves(workflow):
    assert pm.write_resolved(workflow, write=False) == pm.experiments(workflow)
    assert not Path("results").exists()


def test_concurrent_writers_leave_whole_files(workflow):
    """Two Snakemake processes parsing at once (e.g. the main one and a job's nested one): each compares first and
    replaces whole files, so a reader never sees a mixture and the result is the one config both resolved."""
    errors = []

    def write() -> None:
        try:
            for _ in range(5):
                pm.write_resolved(workflow)
        except Exception as err:   # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for experiment, run in pm.experiments(workflow).items():
        assert yaml.safe_load(Path(pm.config_path(workflow, experiment)).read_text()) == run
    assert not [p for p in Path("results").rglob("*") if p.name.startswith(".")]


def test_missing_workflow_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="workflow config not found"):
        pm.load_workflow_file(tmp_path / "workflow.yaml")
