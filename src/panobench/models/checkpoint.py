"""The checkpoint format: reading a stage checkpoint and loading its weights into a model, checked strictly.

Checkpoints hold only what a stage saves (the stage table's ``saved_components``; the frozen backbones are reloaded
from their recorded source) together with ``checkpoint["panobench"]``: the model signature, config hash, stage and
exact key list. Loading checks all of it and fails on any mismatch (defect 4 of the original code: silent
``strict=False`` loads). Keys are named as in the training system, which holds the PanoVLM as ``model``.

Pure torch: evaluation loads checkpoints through this module without importing the training layer or Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from panobench.config import RunConfig, config_hash, config_to_dict, model_signature
from panobench.errors import CheckpointError
from panobench.stages import RECIPE_STAGE, component_of, get_stage, relative_to_dir, stage_dir

CHECKPOINT_FORMAT = 1
MODEL_PREFIX = "model."   # the training system's attribute holding the PanoVLM; every model key carries it


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with ``weights_only=True``; any failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any parse failure (a legacy-format text file raises IndexError) is one error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("panobench"), dict):
        raise CheckpointError(f"{path}: not a panobench checkpoint (no state_dict/panobench metadata)")
    return ckpt


def check_same_run(meta: dict[str, Any], current: dict[str, Any], *, what: str) -> None:
    """The checkpoint's stage and model signature must be the ones ``current`` describes."""
    if meta.get("stage") != current["stage"]:
        raise CheckpointError(f"{what} is from stage {meta.get('stage')!r}, expected {current['stage']!r}")
    if meta.get("model_signature") != current["model_signature"]:
        diff = sorted(k for k in current["model_signature"]
                      if meta.get("model_signature", {}).get(k) != current["model_signature"][k])
        raise CheckpointError(f"{what} was written for a different model config (differs in: {', '.join(diff)})")


def saved_keys(state_keys: Any, cfg: RunConfig, stage: str, *, resampler_has_grid: bool) -> list[str]:
    """The keys of ``state_keys`` (system-relative names) that a checkpoint of ``stage`` holds, sorted."""
    keep = get_stage(stage).saved_components(resampler_has_grid=resampler_has_grid,
                                             train_resampler=cfg.stages[stage].train_resampler)
    return sorted(k for k in state_keys if component_of(k) in keep)


def checkpoint_metadata(cfg: RunConfig, stage: str, model: nn.Module, keys: list[str],
                        vision_checkpoint: str | None) -> dict[str, Any]:
    """``checkpoint["panobench"]``: what the checkpoint is (stage, cell, config, model signature, exact keys)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "cell_id": cfg.cell_id,
        "config_hash": config_hash(cfg),
        "model_signature": model_signature(cfg),
        "resampler": {"type": cfg.resampler.type, "config": model.resampler.config_dict()},
        "keys": keys,
        "vision_checkpoint": vision_checkpoint,
        "resolved_config": config_to_dict(cfg),
    }


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}


def load_component(model: nn.Module, ckpt: dict[str, Any], comp: str, path: str | os.PathLike) -> None:
    """Copy one component's tensors strictly: same key set, same shapes."""
    own = {k: v for k, v in _model_state(model).items() if component_of(k) == comp}
    theirs = {k: v for k, v in ckpt["state_dict"].items() if component_of(k) == comp}
    if set(own) != set(theirs):
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        raise CheckpointError(f"{path}: {comp} weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in theirs.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        params = {MODEL_PREFIX + k: p for k, p in model.named_parameters()}
        for k, v in theirs.items():
            params[k].copy_(v.to(params[k].dtype))


def has_component(model: nn.Module, comp: str) -> bool:
    return any(component_of(k) == comp for k in _model_state(model))


def load_vision_checkpoint(model: nn.Module, cfg: RunConfig, path: str | os.PathLike) -> str:
    """Stage-1 checkpoint -> the vision encoder (strict); the resampler only when ``vision.reuse_resampler``.

    Symmetric starts (SPEC §5b): by default a stage-1 checkpoint initialises only what every arm shares, the vision
    tower. Its resampler weights fit one resampler type, so loading them by default would pre-train one arm and
    not the others. With ``reuse_resampler`` they must fit this arm exactly (else an error, never a silent fresh
    init). Returns ``resampler_init``: "loaded" or "fresh".
    """
    ckpt = load_checkpoint_file(path)
    meta = ckpt["panobench"]
    if meta.get("stage") != RECIPE_STAGE:
        raise CheckpointError(f"{path}: expected a stage-1 ({RECIPE_STAGE}) checkpoint, got stage "
                              f"{meta.get('stage')!r}")
    theirs, ours = meta["model_signature"]["vision"], model_signature(cfg)["vision"]
    if theirs != ours:
        raise CheckpointError(f"{path}: vision checkpoint was trained from {theirs}, this run uses {ours}")
    load_component(model, ckpt, "vision", path)
    if not cfg.vision.reuse_resampler:
        return "fresh"
    res = meta.get("resampler", {})
    ckpt_has_resampler = any(component_of(k) == "resampler" for k in ckpt["state_dict"])
    if not ckpt_has_resampler or res.get("type") != cfg.resampler.type or \
            res.get("config") != model.resampler.config_dict():
        raise CheckpointError(
            f"{path}: vision.reuse_resampler is set but the checkpoint's resampler ({res.get('type')}, "
            f"{'weights' if ckpt_has_resampler else 'no weights'}) does not fit this arm's {cfg.resampler.type} "
            f"{model.resampler.config_dict()}; unset reuse_resampler to start every arm's resampler fresh")
    load_component(model, ckpt, "resampler", path)
    return "loaded"


def load_stage_checkpoint(model: nn.Module, cfg: RunConfig, stage: str, path: str | os.PathLike) -> dict[str, Any]:
    """Evaluation: load a stage checkpoint strictly into a freshly built model of the same stage and config.

    Returns the checkpoint's metadata plus its ``global_step``.
    """
    if not get_stage(stage).captions:
        raise CheckpointError(f"{path}: a stage-{get_stage(stage).number} ({stage}) checkpoint has no captioning "
                              "model to load for evaluation")
    ckpt = load_checkpoint_file(path)
    check_same_run(ckpt["panobench"], {"stage": stage, "model_signature": model_signature(cfg)}, what=str(path))
    expected = set(saved_keys(_model_state(model), cfg, stage,
                              resampler_has_grid=model.resampler.output_grid(model.vision.grid) is not None))
    got = set(ckpt["state_dict"])
    if got != expected:
        raise CheckpointError(f"{path}: keys differ from the model (missing {sorted(expected - got)[:3]}, "
                              f"unexpected {sorted(got - expected)[:3]})")
    # Every key is a model key (captioning stages save no VICReg projector): strip the system's prefix.
    model.load_state_dict({k.removeprefix(MODEL_PREFIX): v for k, v in ckpt["state_dict"].items()}, strict=False)
    return {**ckpt["panobench"], "global_step": ckpt.get("global_step")}


# ------------------------------------------------------------------------------------------ run directories


def run_paths(run_dir: str | os.PathLike, *, vision_checkpoint: str | os.PathLike | None,
              previous_checkpoint: str | os.PathLike | None) -> dict[str, str | None]:
    """Where a run directory's inputs are, relative to the run directory (``paths`` of checkpoint_metadata.json).

    ``workdir`` is the training run's working directory, to which the relative paths of its config.yaml refer.
    Recorded relative to the run directory, they hold wherever the run tree is evaluated from or copied to.
    """
    return {"workdir": relative_to_dir(Path.cwd(), run_dir),
            "vision_checkpoint": relative_to_dir(vision_checkpoint, run_dir) if vision_checkpoint else None,
            "previous_checkpoint": relative_to_dir(previous_checkpoint, run_dir) if previous_checkpoint else None}


def run_workdir(cfg: RunConfig, meta: dict[str, Any], run_dir: str | os.PathLike) -> Path | None:
    """The working directory that the relative paths of a run directory's config.yaml refer to, found from the run
    directory itself (``paths.workdir`` of its checkpoint_metadata.json ``meta``), wherever the run tree now is.

    None when the run directory does not say (written before it recorded its paths) or does not sit at its config's
    place under that directory (a single run directory copied out of its tree): then paths are read as configured.
    """
    paths = meta.get("paths")
    if not isinstance(paths, dict) or not paths.get("workdir"):
        return None
    workdir = Path(os.path.normpath(Path(run_dir).absolute() / paths["workdir"]))
    if not workdir.is_dir() or (workdir / stage_dir(cfg, meta["stage"])).resolve() != Path(run_dir).resolve():
        return None
    return workdir
