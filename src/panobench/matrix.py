"""The experiment matrix: workflow config -> cells, their ids, paths and resolved run configs.

The Snakemake workflow (``rules/common.smk``) imports this module so that cell ids and paths have one definition,
and calls :func:`write_resolved` once to build and write every cell's run config; Python code never imports
Snakemake. A cell is one (overlap, resampler, vision checkpoint, seed) combination; a
vision checkpoint is ``pretrained`` (no stage 1), an existing ``path``, or a ``train`` recipe trained once with
stage 1 and shared by every cell that names it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from panobench.config import config_to_dict, run_config_from_dict
from panobench.errors import ConfigError
from panobench.models.resamplers import check_resampler_type  # torch-free: the registry imports lazily
from panobench.stages import CROP, EVAL_STAGE_NAMES, EVAL_STAGES, PER_CELL_STAGES, RECIPE_STAGE, STAGES, run_dir
from panobench.utils.io import write_text_if_changed

TRAIN_STAGES = PER_CELL_STAGES   # stages trained per cell (the stage table decides)
EVAL_CHECKPOINT_STAGE: dict[str, str | None] = {e.name: e.weights for e in EVAL_STAGES.values()}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class VisionCheckpoint:
    name: str
    kind: str                            # "pretrained" | "path" | "train"
    path: str | None = None              # kind == "path"
    overlap: float | None = None         # kind == "train": the stage-1 recipe
    resampler: str | None = None
    seed: int | None = None
    reuse_resampler: bool = False        # also start each arm's resampler from it (opt-in; every arm must fit)

    @property
    def recipe_id(self) -> str:
        return f"vision-{self.name}"


@dataclass(frozen=True)
class Cell:
    overlap: float
    fov: float
    resampler: str
    vision: VisionCheckpoint
    seed: int

    @property
    def cell_id(self) -> str:
        return f"ov{self.overlap:.2f}_fov{self.fov:g}_{self.resampler}_vis-{self.vision.name}_seed{self.seed}"

    def knobs(self) -> dict[str, Any]:
        return {"overlap": self.overlap, "fov": self.fov, "resampler": self.resampler,
                "vision_checkpoint": self.vision.name, "seed": self.seed}


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise ConfigError(f"{what} {value!r} must match {_SAFE_NAME.pattern} (it becomes part of file names)")
    return value


def vision_checkpoints(wf: dict[str, Any]) -> list[VisionCheckpoint]:
    out = []
    for i, entry in enumerate(wf["matrix"]["vision_checkpoints"]):
        name = _check_name(entry.get("name"), f"matrix.vision_checkpoints[{i}].name")
        reuse = bool(entry.get("reuse_resampler", False))
        if "train" in entry:
            recipe = entry["train"]
            out.append(VisionCheckpoint(name, "train", overlap=float(recipe["overlap"]),
                                        resampler=_check_name(recipe["resampler"], "recipe resampler"),
                                        seed=int(recipe.get("seed", 0)), reuse_resampler=reuse))
        elif "path" in entry:
            out.append(VisionCheckpoint(name, "path", path=str(entry["path"]), reuse_resampler=reuse))
        else:
            if reuse:
                raise ConfigError(f"matrix.vision_checkpoints[{i}] ({name}): reuse_resampler needs a stage-1 "
                                  "checkpoint (train or path); 'pretrained' has no resampler weights")
            out.append(VisionCheckpoint(name, "pretrained"))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"matrix.vision_checkpoints: duplicate names in {names}")
    return out


def expand_cells(wf: dict[str, Any]) -> list[Cell]:
    """All cells of the matrix, in a stable order."""
    matrix = wf["matrix"]
    fov = float(wf["run"].get("geometry", {}).get("fov", 90.0))
    cells = []
    for vis in vision_checkpoints(wf):
        for overlap in matrix["overlaps"]:
            for resampler in matrix["resamplers"]:
                _check_name(resampler, "resampler")
                for seed in matrix["seeds"]:
                    cells.append(Cell(float(overlap), fov, resampler, vis, int(seed)))
    for i, name in enumerate(dict.fromkeys([*matrix["resamplers"], *(v.resampler for v in vision_recipes(wf))])):
        check_resampler_type(name, f"matrix.resamplers[{i}]")
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ConfigError("matrix expands to duplicate cell ids (repeated overlaps/resamplers/seeds?)")
    for vis in vision_checkpoints(wf):
        if vis.reuse_resampler:
            _check_resampler_reuse(wf, vis)
    return cells


def _resampler_section(wf: dict[str, Any], resampler: str) -> dict[str, Any]:
    """What decides a resampler's weights' shapes in a cell of ``wf``: type, token budget, explicit params."""
    return {"type": resampler, "tokens_per_view": tokens_per_view(wf),
            "params": wf.get("resampler_params", {}).get(resampler, {})}


def _check_resampler_reuse(wf: dict[str, Any], vis: VisionCheckpoint) -> None:
    """Symmetric starts: reusing stage-1 resampler weights is refused unless every arm could load them."""
    if vis.kind == "train":
        theirs = _resampler_section(wf, str(vis.resampler))
        where = f"stage-1 recipe {vis.name!r} (resampler {vis.resampler})"
    else:
        saved = Path(str(vis.path)).parent / "config.yaml"   # written beside every checkpoint by panobench train
        if not saved.is_file():
            raise ConfigError(f"matrix.vision_checkpoints {vis.name!r}: reuse_resampler needs {saved} (the resolved "
                              "config panobench train writes beside the checkpoint) to check every arm can use it")
        section = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("resampler", {})
        theirs = {"type": section.get("type"), "tokens_per_view": section.get("tokens_per_view"),
                  "params": section.get("params", {})}
        where = f"vision checkpoint {vis.path} (resampler {theirs['type']})"
    misfits = [r for r in wf["matrix"]["resamplers"] if _resampler_section(wf, r) != theirs]
    if misfits:
        raise ConfigError(f"matrix.vision_checkpoints {vis.name!r}: reuse_resampler would start only some arms from "
                          f"pre-trained resampler weights: {where} cannot initialise the {', '.join(misfits)} arm(s) "
                          "(different type or size); remove reuse_resampler (the default shares only the vision "
                          "tower) or restrict matrix.resamplers to arms that fit")


def tokens_per_view(wf: dict[str, Any]) -> int | None:
    """The visual-token budget per view every resampler derives its size from (top-level ``tokens_per_view``)."""
    value = wf.get("tokens_per_view")
    return None if value is None else int(value)


def vision_recipes(wf: dict[str, Any]) -> list[VisionCheckpoint]:
    """Stage-1 recipes that some cell uses (each trained once)."""
    return [v for v in vision_checkpoints(wf) if v.kind == "train"]


# ------------------------------------------------------------------------------------------ paths


def runs_root(wf: dict[str, Any]) -> str:
    return f"{wf.get('runs_dir', 'runs')}/{wf['name']}"


def stage_dir(wf: dict[str, Any], experiment: str, stage: str, resampler: str) -> str:
    """The seed's layout: runs/<experiment>/<stage>/<crop>_<resampler>/ (experiment = cell or recipe id).

    Plain formatting: the rules pass Snakemake wildcards (``"{cell}"``) for ``experiment`` and ``resampler``.
    """
    return run_dir(wf.get("runs_dir", "runs"), wf["name"], experiment, stage, resampler)


def stage_marker(wf: dict[str, Any], experiment: str, stage: str, resampler: str) -> str:
    """The file whose presence marks a finished stage (written last by ``panobench train``)."""
    return f"{stage_dir(wf, experiment, stage, resampler)}/measurements.json"


def _job_stem(stage: str, experiment: str, resampler: str) -> str:
    # Per-cell stages nest under the cell like their run directory; a shared stage-1 recipe is one flat file.
    return f"{experiment}/{CROP}_{resampler}" if STAGES[stage].per_cell else f"{experiment}_{resampler}"


def train_log(wf: dict[str, Any], experiment: str, stage: str, resampler: str) -> str:
    return f"logs/{wf['name']}/train_{stage}/{_job_stem(stage, experiment, resampler)}.log"


def train_benchmark(wf: dict[str, Any], experiment: str, stage: str, resampler: str) -> str:
    return f"benchmarks/{wf['name']}/train_{stage}/{_job_stem(stage, experiment, resampler)}.tsv"


def train_patterns(wf: dict[str, Any], stage: str) -> dict[str, str]:
    """A training rule's file patterns (Snakemake wildcards ``{cell}`` or ``{recipe}``, and ``{resampler}``):
    its config input, completion marker, log and benchmark."""
    experiment = "{cell}" if STAGES[stage].per_cell else "{recipe}"
    return {"config": config_path(wf, experiment),
            "marker": stage_marker(wf, experiment, stage, "{resampler}"),
            "log": train_log(wf, experiment, stage, "{resampler}"),
            "benchmark": train_benchmark(wf, experiment, stage, "{resampler}")}


def config_path(wf: dict[str, Any], experiment: str) -> str:
    return f"results/{wf['name']}/configs/{experiment}.yaml"


def eval_dir(wf: dict[str, Any], cell_id: str, stage: str) -> str:
    return f"{runs_root(wf)}/{cell_id}/eval/{stage}"


def vision_checkpoint_file(wf: dict[str, Any], vis: VisionCheckpoint) -> str | None:
    if vis.kind == "train":
        return f"{stage_dir(wf, vis.recipe_id, RECIPE_STAGE, str(vis.resampler))}/best.ckpt"
    if vis.kind == "path":
        return vis.path
    return None


# ------------------------------------------------------------------------------------------ resolution


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _fill_defaults(data: dict[str, Any], schema: dict[str, Any]) -> None:
    """Fill missing properties with their schema defaults, recursively into objects (as Snakemake's validate)."""
    for key, sub in schema.get("properties", {}).items():
        if key not in data and "default" in sub:
            data[key] = copy.deepcopy(sub["default"])
        if isinstance(data.get(key), dict) and isinstance(sub, dict):
            _fill_defaults(data[key], sub)


def load_workflow(configfiles: list[str | Path], root: str | Path = ".") -> dict[str, Any]:
    """The workflow config Snakemake builds for ``snakemake --configfile FILES...`` in ``root``: the Snakefile's
    ``config/config.yaml``, then each file deep-merged in order, then the schema's defaults. Scripts that name
    Snakemake targets derive them from this, so they name exactly what the rules produce."""
    root = Path(root)
    wf = yaml.safe_load((root / "config" / "config.yaml").read_text(encoding="utf-8")) or {}
    for path in configfiles:
        # root / path is path itself when path is absolute.
        wf = _deep_merge(wf, yaml.safe_load((root / path).read_text(encoding="utf-8")) or {})
    _fill_defaults(wf, yaml.safe_load((root / "config" / "schema.yaml").read_text(encoding="utf-8")))
    return wf


def _resolve(wf: dict[str, Any], experiment: str, overlap: float, resampler: str, seed: int,
             vis: VisionCheckpoint | None) -> dict[str, Any]:
    run = copy.deepcopy(wf.get("run", {}))
    params = copy.deepcopy(wf.get("resampler_params", {}).get(resampler, {}))
    knobs: dict[str, Any] = {
        "name": wf["name"],
        "cell_id": experiment,
        "seed": seed,
        "runs_dir": wf.get("runs_dir", "runs"),
        "geometry": {"overlap": overlap},
        "resampler": {"type": resampler, "params": params},
    }
    if tokens_per_view(wf) is not None:
        knobs["resampler"]["tokens_per_view"] = tokens_per_view(wf)
    if vis is not None:
        knobs["vision"] = {"checkpoint": vision_checkpoint_file(wf, vis), "checkpoint_name": vis.name,
                           "reuse_resampler": vis.reuse_resampler}
    # Keys sorted first: the free-form mappings (resampler params, arch) then come out in one order whatever order the
    # workflow config lists them in, so a cell's written config changes only when a value does.
    data = _sorted_keys(_deep_merge(run, knobs))
    # Validate now: a bad matrix fails when the DAG is built, not hours later in a job.
    return config_to_dict(run_config_from_dict(data))


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted_keys(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_sorted_keys(v) for v in value]
    return value


def resolve_cell(wf: dict[str, Any], cell: Cell) -> dict[str, Any]:
    """The complete run config of one cell, as plain data (validated)."""
    return _resolve(wf, cell.cell_id, cell.overlap, cell.resampler, cell.seed, cell.vision)


def resolve_recipe(wf: dict[str, Any], vis: VisionCheckpoint) -> dict[str, Any]:
    """The run config that trains a stage-1 (vision) recipe."""
    assert vis.kind == "train"
    return _resolve(wf, vis.recipe_id, float(vis.overlap), str(vis.resampler), int(vis.seed or 0), None)


def experiments(wf: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """experiment id (cell or recipe) -> resolved run config."""
    out = {v.recipe_id: resolve_recipe(wf, v) for v in vision_recipes(wf)}
    out.update({c.cell_id: resolve_cell(wf, c) for c in expand_cells(wf)})
    return out


def workflow_path(wf: dict[str, Any]) -> str:
    """The validated workflow config as the DAG build wrote it (read by ``panobench plan`` and ``partial-report``)."""
    return f"results/{wf['name']}/workflow.yaml"


def write_resolved(wf: dict[str, Any], *, write: bool = True) -> dict[str, dict[str, Any]]:
    """Resolve every experiment of the validated workflow config ``wf`` once and write the files the jobs read.

    Called once when the Snakefile is parsed. Every cell's and stage-1 recipe's run config is built and strictly
    checked (:func:`experiments`) before anything is written, so a bad matrix writes nothing. Then
    ``results/<name>/workflow.yaml`` (``wf`` itself) and ``results/<name>/configs/<experiment>.yaml`` are written,
    each atomically and only where its content changed: an unchanged file keeps its mtime, so Snakemake's mtime
    trigger re-runs exactly the cells whose resolved config changed. Snakemake processes parsing at the same time
    are safe: each compares first and replaces whole files.

    Args:
        wf: the workflow config after schema validation (Snakemake's ``config``).
        write: False where the files must already exist (a job's nested Snakemake on a cluster node re-parses the
            Snakefile; only the main process writes).

    Returns:
        experiment id (cell or recipe) -> its resolved run config as plain data.
    """
    resolved = experiments(wf)
    if write:
        write_text_if_changed(workflow_path(wf), yaml.safe_dump(_sorted_keys(wf), sort_keys=False))
        for experiment, run in resolved.items():
            write_text_if_changed(config_path(wf, experiment), yaml.safe_dump(run, sort_keys=False))
    return resolved


def load_workflow_file(path: str | Path) -> dict[str, Any]:
    """Read ``results/<name>/workflow.yaml`` (written by :func:`write_resolved`; already validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"workflow config not found: {path} (written when Snakemake builds the DAG)")
    wf = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(wf, dict) or "name" not in wf or "matrix" not in wf:
        raise ConfigError(f"{path}: not a workflow config (expected a mapping with name and matrix)")
    return wf


def manifest(wf: dict[str, Any]) -> dict[str, Any]:
    """What the aggregation step expects to find: every cell with its knobs and file paths."""
    cells = []
    for cell in expand_cells(wf):
        cid = cell.cell_id
        cells.append({
            "cell_id": cid,
            "knobs": cell.knobs(),
            "config": config_path(wf, cid),
            "stages": {
                stage: {
                    "run_dir": stage_dir(wf, cid, stage, cell.resampler),
                    "measurements": stage_marker(wf, cid, stage, cell.resampler),
                    "log": train_log(wf, cid, stage, cell.resampler),
                    "benchmark": train_benchmark(wf, cid, stage, cell.resampler),
                }
                for stage in TRAIN_STAGES
            },
            "evals": {
                stage: {
                    "predictions": f"{eval_dir(wf, cid, stage)}/predictions.csv",
                    "generation": f"{eval_dir(wf, cid, stage)}/generation.json",
                    "metrics": f"{eval_dir(wf, cid, stage)}/metrics.json" if wf.get("score", True) else None,
                    "log": generate_log(wf, cid),
                    "benchmark": generate_benchmark(wf, cid),   # one generate job per cell serves every stage
                }
                for stage in wf.get("eval_stages", EVAL_STAGE_NAMES)
            },
        })
    recipes = [{"recipe_id": v.recipe_id, "name": v.name,
                "measurements": stage_marker(wf, v.recipe_id, RECIPE_STAGE, str(v.resampler)),
                "benchmark": train_benchmark(wf, v.recipe_id, RECIPE_STAGE, str(v.resampler))}
               for v in vision_recipes(wf)]
    return {"name": wf["name"], "cells": cells, "vision_recipes": recipes,
            "overlaps": [float(o) for o in wf["matrix"]["overlaps"]], "tokens_per_view": tokens_per_view(wf),
            "data_fingerprint": data_fingerprint_path(wf), "score_benchmark": score_benchmark(wf)}


def score_benchmark(wf: dict[str, Any]) -> str:
    """The one score job's Snakemake benchmark TSV (the CPU line of the bill)."""
    return f"benchmarks/{wf['name']}/score.tsv"


def generate_log(wf: dict[str, Any], cell_id: str) -> str:
    return f"logs/{wf['name']}/generate/{cell_id}.log"


def generate_benchmark(wf: dict[str, Any], cell_id: str) -> str:
    return f"benchmarks/{wf['name']}/generate/{cell_id}.tsv"


def data_fingerprint_path(wf: dict[str, Any]) -> str:
    """The fingerprint of the config's data (CSVs + images), computed once per config and recorded by every job."""
    return f"results/{wf['name']}/data_fingerprint.json"


def tiles_sheet_path(wf: dict[str, Any], overlap: float) -> str:
    return f"results/{wf['name']}/tiles/ov{overlap:.2f}.png"


def report_dir(wf: dict[str, Any]) -> str:
    return f"reports/{wf['name']}"


def manifest_path(wf: dict[str, Any]) -> str:
    """The matrix manifest (``panobench plan``) that aggregation and the report read."""
    return f"results/{wf['name']}/manifest.json"


# ------------------------------------------------------------------------------------------ data preparation

PREPARED_SPLITS = ("train", "valid", "test")
# `source:` key -> `panobench prepare-data` flag; keys left out of the config take the CLI's defaults.
PREPARE_DATA_FLAGS = {
    "on_missing": "--on-missing",
    "min_width": "--min-width",
    "min_height": "--min-height",
    "workers": "--workers",
    "timeout_s": "--timeout",
    "retries": "--retries",
}


def prepared_data_outputs(data: dict[str, Any]) -> dict[str, Any]:
    """What the ``prepare_data`` rule writes for a config with a ``source:`` block, given the resolved ``run.data``.

    ``panobench prepare-data --out <run.data.root>`` writes ``<root>/{train,valid,test}.csv``, ``manifest.json`` and
    ``dropped.csv``; the run's CSVs must be exactly those files, or training would read something other than what
    was prepared.

    Returns:
        ``{"out": root, "csvs": [the train, valid, test CSV paths as run.data writes them], "manifest": path,
        "dropped": path}``.

    Raises:
        ConfigError: a ``run.data.<split>_csv`` that is not ``<root>/<split>.csv``.
    """
    root = data["root"]
    csvs = []
    for split in PREPARED_SPLITS:
        key = f"{split}_csv"
        if Path(data[key]) != Path(root) / f"{split}.csv":
            raise ConfigError(
                f"run.data.{key} is {data[key]!r}, but with a source: block the data is prepared into run.data.root "
                f"({root!r}) and prepare-data writes {Path(root, f'{split}.csv').as_posix()!r}; set run.data.{key} "
                "to that path"
            )
        csvs.append(data[key])
    return {"out": root, "csvs": csvs, "manifest": f"{root}/manifest.json", "dropped": f"{root}/dropped.csv"}


def prepare_data_options(source: dict[str, Any]) -> list[str]:
    """The ``prepare-data`` flags for the optional ``source:`` keys that the config sets (an argv list)."""
    options: list[str] = []
    for key, flag in PREPARE_DATA_FLAGS.items():
        if key in source:
            options += [flag, str(source[key])]
    return options


def published_csv_inputs(source: dict[str, Any]) -> list[str]:
    """The published CSVs that are local files (URLs cannot be Snakemake inputs; they are fetched by the job)."""
    return [source[s] for s in PREPARED_SPLITS if not re.match(r"^https?://", source[s], re.IGNORECASE)]
