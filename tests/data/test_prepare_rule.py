"""The prepare_data rule really runs: a config with a `source:` block gets run.data's CSVs from `panobench
prepare-data`, and a job downstream reads them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from loopback_http import LoopbackServer, Route
from prepare_helpers import published_rows, write_published

from panobench import cli

pytestmark = [pytest.mark.loopback, pytest.mark.workflow]

REPO = Path(__file__).resolve().parents[2]


def _workflow_helpers():
    """tests/workflow/workflow_helpers.py (copy_workflow, run_snakemake), loaded under its own module name."""
    spec = importlib.util.spec_from_file_location("panobench_workflow_helpers",
                                                  REPO / "tests" / "workflow" / "workflow_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepare_data_rule_feeds_the_workflow(server: LoopbackServer, synthetic, tmp_path: Path) -> None:
    helpers = _workflow_helpers()
    images, rows = synthetic
    wf = helpers.copy_workflow(tmp_path / "wf")
    local = write_published(wf / "published", published_rows(server, images, rows))
    server.routes["/csv/test.csv"] = Route(body=Path(local["test"]).read_bytes(), content_type="text/csv")
    cfg = yaml.safe_load(helpers.SMALL_CONFIG.read_text())
    cfg["synthetic"] = None
    cfg["source"] = {"train": "published/train.csv", "valid": "published/valid.csv",
                     "test": server.url("/csv/test.csv"), "min_width": 64, "min_height": 32, "workers": 2}
    cfg["run"]["data"].update(root="data/prepared", train_csv="data/prepared/train.csv",
                              valid_csv="data/prepared/valid.csv", test_csv="data/prepared/test.csv")
    (wf / "config" / "prepared.yaml").write_text(yaml.safe_dump(cfg))

    tiles = "results/small/tiles/ov0.00.png"  # plot_tiles reads the prepared test CSV and its images
    helpers.run_snakemake(wf, "prepare_data", tiles, "--cores", "1", "--configfile", "config/prepared.yaml")
    assert (wf / tiles).is_file()
    assert "prepared data/prepared:" in (wf / "logs" / "small" / "prepare_data.log").read_text()
    assert server.counts["/csv/test.csv"] == 1
    assert {p: n for p, n in server.counts.items() if p.startswith("/img/")} == \
        {p: 1 for p in server.routes if p.startswith("/img/")}
    assert cli.main(["prepare-data", "--verify", "--out", str(wf / "data" / "prepared"), "--no-progress"]) == 0

    proc = helpers.run_snakemake(wf, "prepare_data", tiles, "-n", "--cores", "1", "--configfile",
                                 "config/prepared.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr
