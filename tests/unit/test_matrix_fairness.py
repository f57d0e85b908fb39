"""Fair comparisons at the matrix level: one token budget for every arm, symmetric starts from stage-1 checkpoints."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml

from panobench import matrix as pm
from panobench.errors import ConfigError
from panobench.models.resamplers import RESAMPLERS, build_resampler

REPO = Path(__file__).resolve().parents[2]
DEFAULT = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TINY_HEADS = {"qformer": {"num_heads": 4}, "perceiver": {"num_heads": 4}}


def _wf(**changes) -> dict:
    wf = copy.deepcopy(DEFAULT)
    wf.update(changes)
    return wf


@pytest.mark.parametrize("name", sorted(RESAMPLERS))
@pytest.mark.parametrize(("grid", "budget"), [(8, 16), (8, 64), (16, 64), (16, 16)])
def test_every_resampler_derives_its_size_from_the_budget(name, grid, budget):
    resampler = build_resampler(name, 32, dict(TINY_HEADS.get(name, {})), tokens_per_view=budget, input_grid=grid)
    assert resampler.num_output_tokens(grid * grid) == budget
    out = resampler(torch.randn(2, grid * grid, 32))
    assert out.shape[:2] == (2, budget)


@pytest.mark.parametrize("name", ["mlp", "bimamba"])
def test_a_budget_the_grid_cannot_pool_to_is_an_error_listing_the_possible_ones(name):
    with pytest.raises(ConfigError, match=r"tokens_per_view=20 .*8×8.*\[1, 4, 16, 64\]"):
        build_resampler(name, 32, {}, tokens_per_view=20, input_grid=8)


def test_an_explicit_param_overrides_the_budget_on_purpose(caplog):
    resampler = build_resampler("mlp", 32, {"pool_factor": 1}, tokens_per_view=16, input_grid=8)
    assert resampler.num_output_tokens(64) == 64
    assert "override the tokens_per_view=16 budget" in caplog.text


def test_the_default_config_gives_every_arm_the_same_tokens_per_view():
    wf = _wf()
    assert pm.tokens_per_view(wf) == 16
    cells = pm.experiments(wf)
    assert {c["resampler"]["tokens_per_view"] for c in cells.values()} == {16}
    # No per-resampler size keys left that would override the budget.
    for name, params in wf["resampler_params"].items():
        derived = RESAMPLERS[name][0].params_for_budget(16, 8)
        assert not set(derived) & set(params), (name, params)
    assert pm.manifest(wf)["tokens_per_view"] == 16


@pytest.mark.parametrize("config", ["quic360.yaml", "gpu-speed.yaml", "gpu-speed-b1.yaml", "gpu-speed-smoke.yaml"])
def test_shipped_configs_set_one_budget_and_no_overriding_size_keys(config):
    wf = yaml.safe_load((REPO / "config" / config).read_text())
    budget = pm.tokens_per_view(wf)
    assert budget is not None
    size_keys = {"pool_factor", "num_queries", "num_latents"}
    for name, params in wf.get("resampler_params", {}).items():
        assert not size_keys & set(params), (config, name, params)


def test_stage1_checkpoints_share_only_the_vision_tower_by_default():
    wf = _wf()
    for cfg in pm.experiments(wf).values():
        assert cfg["vision"]["reuse_resampler"] is False


def test_reuse_resampler_is_refused_when_any_arm_could_not_use_it():
    wf = _wf()
    recipe = next(v for v in wf["matrix"]["vision_checkpoints"] if "train" in v)
    assert "train" in recipe and recipe["train"]["resampler"] == "mlp"
    recipe["reuse_resampler"] = True
    with pytest.raises(ConfigError, match=r"reuse_resampler.*bimamba, qformer, perceiver arm"):
        pm.expand_cells(wf)
    wf["matrix"]["resamplers"] = ["mlp"]            # every arm fits the recipe: allowed, and resolved as asked
    cells = pm.experiments(wf)
    reused = [c for c in cells.values() if c["vision"]["checkpoint_name"] == recipe["name"]]
    assert reused and all(c["vision"]["reuse_resampler"] for c in reused)


def test_reuse_resampler_of_a_path_checkpoint_is_checked_against_its_saved_config(tmp_path):
    ckpt_dir = tmp_path / "vision" / "anyres-e2p_qformer"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "best.ckpt").write_bytes(b"")
    wf = _wf()
    wf["matrix"]["vision_checkpoints"] = [{"name": "ext", "path": str(ckpt_dir / "best.ckpt"),
                                           "reuse_resampler": True}]
    with pytest.raises(ConfigError, match="config.yaml"):
        pm.expand_cells(wf)                          # no saved config: cannot check, refused
    (ckpt_dir / "config.yaml").write_text(yaml.safe_dump(
        {"resampler": {"type": "qformer", "tokens_per_view": 16, "params": {"depth": 1, "num_heads": 4}}}))
    with pytest.raises(ConfigError, match="mlp, bimamba, perceiver arm"):
        pm.expand_cells(wf)
    wf["matrix"]["resamplers"] = ["qformer"]
    assert len(pm.expand_cells(wf)) == 2 * 2        # 2 overlaps x 2 seeds


def test_reuse_resampler_needs_a_stage1_checkpoint():
    wf = _wf()
    wf["matrix"]["vision_checkpoints"].insert(0, {"name": "pretrained", "reuse_resampler": True})   # the tower as loaded
    with pytest.raises(ConfigError, match="pretrained.*no resampler weights|no resampler weights"):
        pm.vision_checkpoints(wf)


def test_manifest_lists_blind_eval_and_the_generate_benchmark():
    wf = _wf(eval_stages=["baseline", "finetune", "blind"])
    cell = pm.manifest(wf)["cells"][0]
    assert set(cell["evals"]) == {"baseline", "finetune", "blind"}
    assert cell["evals"]["blind"]["benchmark"] == f"benchmarks/default/generate/{cell['cell_id']}.tsv"
    assert pm.EVAL_CHECKPOINT_STAGE["blind"] == "finetune"
