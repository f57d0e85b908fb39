"""Keep-going and determinism: one bad cell fails alone and is reported; a cell re-run from scratch gives
identical results."""

from __future__ import annotations

import json

import pandas as pd
import torch
from reliability_helpers import CELL_A, RECIPE, eval_dir, stage_dir

BROKEN = "ov0.00_fov90_mlp_vis-broken_seed0"


def test_failed_cell_is_reported_and_the_other_cell_completes(keep_going_run):
    """Guarantee: with ``--keep-going``, a cell whose input is bad (its stage-1 checkpoint is a corrupt file) fails
    with a one-line error naming the file, every other cell still completes, Snakemake exits non-zero, and the
    report (results.csv + report.html) lists the failed cell with its error line and the others as ok."""
    wd = keep_going_run.workdir
    assert keep_going_run.returncode != 0
    log = (wd / "logs/small/train_resampler" / BROKEN / "anyres-e2p_mlp.log").read_text().strip().splitlines()
    assert log[-1].startswith("panobench train: error: ") and "resources/broken.ckpt" in log[-1], log[-3:]
    assert not (stage_dir(wd, BROKEN, "resampler") / "measurements.json").exists()
    assert not (eval_dir(wd, BROKEN) / "metrics.json").exists()
    assert (eval_dir(wd, CELL_A) / "metrics.json").is_file()

    results = pd.read_csv(wd / "reports/small/results.csv")
    status = results.groupby("cell_id")["status"].agg(set).to_dict()
    assert status[CELL_A] == {"ok"}, results[["cell_id", "stage", "status", "error"]]
    assert status[BROKEN] == {"failed"}
    stage2 = results[(results.cell_id == BROKEN) & (results.stage == "resampler")].iloc[0]
    assert "resources/broken.ckpt" in stage2["error"] and "\n" not in stage2["error"]
    html = (wd / "reports/small/report.html").read_text()
    assert BROKEN in html and "resources/broken.ckpt" in html


def _metrics(path) -> dict:
    return json.loads(path.read_text())["metrics"]


def test_same_cell_twice_from_scratch_gives_identical_results(keep_going_run, reference_run):
    """Guarantee (determinism): the same cell run twice from scratch in separate directories (CPU, same seed) —
    data synthesis, tiny models, stage 1, 2, 3, generation, scoring — gives identical metrics.json metric values,
    identical predictions and bit-identical checkpoints."""
    a, b = keep_going_run.workdir, reference_run.workdir
    cfg = f"results/small/configs/{CELL_A}.yaml"
    assert (a / cfg).read_text() == (b / cfg).read_text(), "precondition: both runs resolved the same cell config"
    assert _metrics(eval_dir(a, CELL_A) / "metrics.json") == _metrics(eval_dir(b, CELL_A) / "metrics.json")
    assert (eval_dir(a, CELL_A) / "predictions.csv").read_text() == (eval_dir(b, CELL_A) / "predictions.csv").read_text()
    for experiment, stage in ((RECIPE, "vision"), (CELL_A, "resampler"), (CELL_A, "finetune")):
        sa = torch.load(stage_dir(a, experiment, stage) / "best.ckpt", map_location="cpu", weights_only=True)
        sb = torch.load(stage_dir(b, experiment, stage) / "best.ckpt", map_location="cpu", weights_only=True)
        assert sa["state_dict"].keys() == sb["state_dict"].keys()
        assert all(torch.equal(sa["state_dict"][k], sb["state_dict"][k]) for k in sa["state_dict"]), (experiment, stage)
