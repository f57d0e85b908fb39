"""``panobench partial-report``: what Snakemake's onerror handler runs after a failed --keep-going run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from panobench import matrix as pm
from panobench.cli import main
from panobench.reporting import partial

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def workflow(tmp_path, monkeypatch) -> dict:
    """The embedded default cut to 2 cells (one overlap, one resampler, two seeds), run from an empty directory."""
    wf = pm.load_workflow([], ROOT)
    wf["matrix"] = {**wf["matrix"], "overlaps": [0.5], "resamplers": ["mlp"],
                    "vision_checkpoints": [{"name": "pretrained"}]}
    monkeypatch.chdir(tmp_path)
    return wf


def _workflow_file(wf: dict) -> str:
    """What the DAG build writes for the onerror handler: results/<name>/workflow.yaml."""
    path = Path(pm.workflow_path(wf))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(wf))
    return str(path)


def _finish_generation(wf: dict, cell_id: str, stage: str) -> Path:
    out = Path(pm.eval_dir(wf, cell_id, stage))
    out.mkdir(parents=True)
    (out / "predictions.csv").write_text("sample_id,prediction\n")
    (out / "generation.json").write_text("{}")
    return out


def test_scores_only_finished_unscored_evaluations(workflow):
    cells = [c.cell_id for c in pm.expand_cells(workflow)]
    done = _finish_generation(workflow, cells[0], "finetune")
    scored = _finish_generation(workflow, cells[0], "baseline")
    (scored / "metrics.json").write_text("{}")
    half = Path(pm.eval_dir(workflow, cells[1], "finetune"))   # generation stopped before generation.json
    half.mkdir(parents=True)
    (half / "predictions.csv").write_text("sample_id,prediction\n")
    assert partial.unscored_predictions(pm.manifest(workflow)) == [(done / "predictions.csv",
                                                                     done / "metrics.json")]
    assert partial.unscored_predictions(pm.manifest({**workflow, "score": False})) == []


def test_writes_manifest_results_and_report_with_failed_cells(workflow, monkeypatch, capsys):
    cells = [c.cell_id for c in pm.expand_cells(workflow)]
    done = _finish_generation(workflow, cells[0], "finetune")
    calls = []
    # Scoring needs Java; what matters here is which files reach the scorer, once, in one call.
    monkeypatch.setattr("panobench.evaluation.predictions.score_predictions_files",
                        lambda pairs: calls.append(list(pairs)))
    sheet = Path(pm.tiles_sheet_path(workflow, 0.5))
    sheet.parent.mkdir(parents=True)
    Image.new("RGB", (64, 32), (10, 200, 30)).save(sheet)

    code = main(["partial-report", "--workflow", _workflow_file(workflow), "--log", "logs/x/partial_report.log"])

    assert code == 0
    assert calls == [[(done / "predictions.csv", done / "metrics.json")]]
    assert json.loads(Path(pm.manifest_path(workflow)).read_text()) == json.loads(json.dumps(pm.manifest(workflow)))
    results = pd.read_csv(Path(pm.report_dir(workflow)) / "results.csv")
    assert set(results["cell_id"]) == set(cells) and (results["status"] == "failed").all()
    html = (Path(pm.report_dir(workflow)) / "report.html").read_text()
    assert all(c in html for c in cells) and 'src="data:image/png;base64,' in html   # the sheet that exists
    assert capsys.readouterr().out.strip() == ("panobench: partial report with the failed cells listed: "
                                               f"{pm.report_dir(workflow)}/report.html")
    assert f"{cells[1]} / resampler failed" in Path("logs/x/partial_report.log").read_text()   # details: the log


def test_failure_names_the_log_and_exits_1(workflow, capsys):
    bad = {**workflow, "matrix": {**workflow["matrix"], "resamplers": ["no_such_resampler"]}}
    code = main(["partial-report", "--workflow", _workflow_file(bad), "--log", "partial.log"])
    assert code == 1
    assert capsys.readouterr().out.strip() == "panobench: could not build the partial report; see partial.log"
    assert "no_such_resampler" in Path("partial.log").read_text()


def test_missing_workflow_file_names_it_in_the_log(workflow, capsys):
    """The handler reads the workflow config the DAG build wrote; without it, one line names the log, which names
    the missing file."""
    code = main(["partial-report", "--workflow", "results/x/workflow.yaml", "--log", "partial.log"])
    assert code == 1
    assert capsys.readouterr().out.strip() == "panobench: could not build the partial report; see partial.log"
    assert "workflow config not found: results/x/workflow.yaml" in Path("partial.log").read_text()
