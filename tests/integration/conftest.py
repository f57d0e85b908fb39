"""Shared fixtures for the integration suite: one synthetic data set and one pair of tiny models per session.

Everything runs on CPU with one intra-op thread: on a 2-core machine, torch's default thread pool oversubscribes
the cores when pytest and a subprocess run side by side and makes each step 10-20x slower.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from panobench.config import RunConfig, run_config_from_dict  # noqa: E402

torch.set_num_threads(1)

TINY_STAGE = {"max_steps": 4, "batch_size": 4, "val_every_n_steps": 2, "limit_val_batches": 1,
              "checkpoint_every_n_steps": 2}

# Small per-resampler settings for the tiny 64-wide SigLIP (8x8 patch grid).
RESAMPLER_PARAMS: dict[str, dict[str, Any]] = {
    "mlp": {"pool_factor": 2},
    "bimamba": {"pool_factor": 2, "depth": 1, "d_state": 4},
    "qformer": {"num_queries": 4, "depth": 1, "num_heads": 4},
    "perceiver": {"num_latents": 4, "depth": 1, "num_heads": 4},
}


@dataclass(frozen=True)
class TinySetup:
    root: Path
    data: Path
    vision: Path
    llm: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    """Synthetic panoramas (48/8/8 images at 256x128) and tiny SigLIP/Qwen3 models, built once per session."""
    from panobench.data.synthetic import generate_synthetic
    from panobench.models.materialize import materialize_tiny_models

    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    generate_synthetic(data, seed=0, n_train=48, n_valid=8, n_test=8, width=256, height=128)
    materialize_tiny_models(root / "models", [data / "train.csv", data / "valid.csv"], seed=0)
    return TinySetup(root=root, data=data, vision=root / "models" / "vision", llm=root / "models" / "llm")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_dict(tiny: TinySetup, runs_dir: Path, **overrides: Any) -> dict[str, Any]:
    """Plain-data run config for the tiny setup; ``overrides`` are deep-merged (``resampler=...`` etc.)."""
    base = {
        "name": "t",
        "cell_id": "c",
        "runs_dir": str(runs_dir),
        "resampler": {"type": "mlp", "params": dict(RESAMPLER_PARAMS["mlp"])},
        "data": {"root": str(tiny.data), "train_csv": str(tiny.data / "train.csv"),
                 "valid_csv": str(tiny.data / "valid.csv"), "test_csv": str(tiny.data / "test.csv"),
                 "erp_height": 64, "erp_width": 128},
        "vision": {"name_or_path": str(tiny.vision), "trainable_blocks": 1},
        "llm": {"name_or_path": str(tiny.llm)},
        "lora": {"r": 4, "alpha": 8},
        "stages": {s: dict(TINY_STAGE) for s in ("vision", "resampler", "finetune")},
        "runtime": {"accelerator": "cpu", "measure_warmup_steps": 1},
    }
    resampler = overrides.pop("resampler", None)
    if resampler is not None:
        # Replaced, not merged: the parameters of one resampler type are unknown keys to another.
        base["resampler"] = {"type": resampler["type"],
                             "params": dict(resampler.get("params", RESAMPLER_PARAMS[resampler["type"]]))}
    return _merge(base, overrides)


def make_config(tiny: TinySetup, runs_dir: Path, **overrides: Any) -> RunConfig:
    return run_config_from_dict(config_dict(tiny, runs_dir, **overrides))


@pytest.fixture()
def cfg_factory(tiny: TinySetup, tmp_path: Path):
    """``cfg_factory(**overrides) -> RunConfig`` writing runs under this test's tmp_path."""

    def factory(**overrides: Any) -> RunConfig:
        return make_config(tiny, tmp_path / "runs", **overrides)

    return factory


@pytest.fixture(scope="session")
def config_maker(tiny: TinySetup):
    """``config_maker(runs_dir, **overrides) -> RunConfig`` for fixtures wider than one test (module/session)."""

    def maker(runs_dir: Path, **overrides: Any) -> RunConfig:
        return make_config(tiny, runs_dir, **overrides)

    return maker


@dataclass(frozen=True)
class TrainedCell:
    """One cell (overlap 0.5, mlp) trained through all three stages with ``train_stage``; treat as read-only."""

    vision_cfg: RunConfig
    cfg: RunConfig                     # stages 2-3: vision.checkpoint = the stage-1 best.ckpt
    vision_dir: Path
    resampler_dir: Path
    finetune_dir: Path
    records: dict[str, dict[str, Any]]


@pytest.fixture(scope="session")
def trained_cell(tiny: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> TrainedCell:
    from panobench.stages import stage_dir
    from panobench.training.runner import train_stage

    runs = tmp_path_factory.mktemp("cell") / "runs"
    short = {**TINY_STAGE, "max_steps": 2}
    vision_cfg = make_config(tiny, runs, stages={"vision": short})
    records = {"vision": train_stage(vision_cfg, "vision")}
    vision_dir = stage_dir(vision_cfg, "vision")
    cfg = make_config(tiny, runs, vision={"checkpoint": str(vision_dir / "best.ckpt"), "checkpoint_name": "vis"},
                      stages={"vision": short, "finetune": short})
    records["resampler"] = train_stage(cfg, "resampler")
    records["finetune"] = train_stage(cfg, "finetune")
    return TrainedCell(vision_cfg, cfg, vision_dir, stage_dir(cfg, "resampler"), stage_dir(cfg, "finetune"), records)
