"""The stage table (panobench.stages) is the one place that says what each stage trains, saves and starts from."""

from __future__ import annotations

import itertools

import pytest

from panobench.config import RunConfig
from panobench.stages import (
    COMPONENTS,
    EVAL_STAGES,
    FINAL_STAGE,
    PER_CELL_STAGES,
    RECIPE_STAGE,
    STAGES,
    eval_stage_of,
    get_stage,
    stage_dir,
)

FLAGS = list(itertools.product([False, True], repeat=2))


@pytest.mark.parametrize("grid, train_resampler", FLAGS)
def test_trained_and_saved_components_per_stage(grid, train_resampler):
    """The sets the two former tables (training/stages.py, training/system.py) held, for every condition."""
    trained = {name: s.trained_components(resampler_has_grid=grid, train_resampler=train_resampler)
               for name, s in STAGES.items()}
    saved = {name: s.saved_components(resampler_has_grid=grid, train_resampler=train_resampler)
             for name, s in STAGES.items()}
    assert trained == {"vision": {"vision", "vicreg"} | ({"resampler"} if grid else set()),
                       "resampler": {"resampler", "projector", "pe"},
                       "finetune": {"lora", "projector", "pe"} | ({"resampler"} if train_resampler else set())}
    assert saved == {"vision": trained["vision"], "resampler": trained["resampler"],
                     "finetune": {"resampler", "projector", "pe", "lora"}}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_is_consistent(name):
    stage = STAGES[name]
    assert stage.trains <= set(COMPONENTS) and stage.carries <= set(COMPONENTS) and "lm" not in stage.trains
    if stage.previous is not None:
        assert get_stage(stage.previous).number < stage.number
        # Evaluation skips the previous stage's weights: its own checkpoint must overwrite every inherited one.
        for grid, train_resampler in FLAGS:
            assert set(stage.inherits) <= stage.saved_components(resampler_has_grid=grid,
                                                                 train_resampler=train_resampler)
    assert stage.attaches_lora == ("lora" in stage.trains)


def test_stage_names_orders_and_evaluations():
    assert [s.number for s in STAGES.values()] == list(range(1, len(STAGES) + 1))
    assert RECIPE_STAGE == "vision" and PER_CELL_STAGES == ("resampler", "finetune") and FINAL_STAGE == "finetune"
    assert {e.name: (e.builds, e.weights, e.image) for e in EVAL_STAGES.values()} == {
        "baseline": ("resampler", None, "dataset"), "resampler": ("resampler", "resampler", "dataset"),
        "finetune": ("finetune", "finetune", "dataset"), "blind": ("finetune", "finetune", "grey")}
    assert [eval_stage_of(s) for s in STAGES] == [None, "resampler", "finetune"]
    with pytest.raises(ValueError, match="unknown stage 'stage4'; expected one of"):
        get_stage("stage4")


def test_run_directory_layout():
    cfg = RunConfig(name="n", cell_id="c", runs_dir="runs")
    assert stage_dir(cfg, "finetune").as_posix() == "runs/n/c/finetune/anyres-e2p_mlp"
