"""A stage's run directory names its inputs relative to itself: ``panobench eval --checkpoint-dir ABS_PATH`` works
from any working directory, and after the run tree has been moved elsewhere.

The run is trained the way the workflow trains it: every path in the config relative to the working directory
(runs, data, models, the stage-1 checkpoint). Before run directories recorded their paths, evaluating its
finetune directory from elsewhere failed with "checkpoint not found: runs/…/resampler/…/best.ckpt".
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from panobench.cli import main
from panobench.stages import stage_dir
from panobench.training.runner import train_stage
from panobench.utils.io import read_json

SHORT = {"max_steps": 2, "batch_size": 4, "val_every_n_steps": 2, "limit_val_batches": 1,
         "checkpoint_every_n_steps": 2}


def _predictions(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        return [(row["sample_id"], row["prediction"]) for row in csv.DictReader(f)]


@pytest.mark.slow
def test_eval_of_a_run_directory_from_another_directory_and_after_a_move(tiny, config_maker, tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    (project / "data").symlink_to(tiny.data)
    (project / "models").symlink_to(tiny.vision.parent)
    monkeypatch.chdir(project)
    relative = {"data": {"root": "data", "train_csv": "data/train.csv", "valid_csv": "data/valid.csv",
                         "test_csv": "data/test.csv"},
                "vision": {"name_or_path": "models/vision"}, "llm": {"name_or_path": "models/llm"},
                "stages": {"vision": SHORT, "resampler": SHORT, "finetune": SHORT}}
    vision_cfg = config_maker(Path("runs"), cell_id="vis", **relative)
    train_stage(vision_cfg, "vision")
    vision_ckpt = stage_dir(vision_cfg, "vision") / "best.ckpt"
    assert not vision_ckpt.is_absolute()
    cfg = config_maker(Path("runs"), **{**relative, "vision": {**relative["vision"], "checkpoint": str(vision_ckpt),
                                                                  "checkpoint_name": "vis"}})
    train_stage(cfg, "resampler")
    train_stage(cfg, "finetune")
    finetune = stage_dir(cfg, "finetune")
    paths = read_json(finetune / "checkpoint_metadata.json")["paths"]
    assert paths["vision_checkpoint"] == "../../../vis/vision/anyres-e2p_mlp/best.ckpt"
    assert paths["previous_checkpoint"] == "../../resampler/anyres-e2p_mlp/best.ckpt"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", "--checkpoint-dir", str(project / finetune), "--out", "here", "--spice", "off"]) == 0
    here = _predictions(elsewhere / "here" / "predictions.csv")
    assert here and (elsewhere / "here" / "metrics.json").is_file()

    moved = tmp_path / "moved"   # the whole run tree (with its inputs) on another machine: the old paths are gone
    shutil.move(project, moved)
    assert main(["eval", "--checkpoint-dir", str(moved / finetune), "--out", "moved", "--spice", "off"]) == 0
    assert _predictions(elsewhere / "moved" / "predictions.csv") == here
    generation = read_json(elsewhere / "moved" / "generation.json")
    assert generation["checkpoint"] == str(moved / finetune / "best.ckpt")
