# Load and check everything before any rule runs; every path and cell id comes from panobench.matrix.
import re
import shlex
from pathlib import Path

from snakemake.utils import validate

from panobench import matrix as pm

validate(config, schema="../config/schema.yaml")

NAME = config["name"]
RUNS = pm.runs_root(config)
# Every cell's run config, built and strictly checked once (a bad matrix fails here, before any job), then written
# to results/NAME/configs/ where its content changed: the jobs read those files, and the mtime of a changed one
# re-runs exactly its cells. A job's nested Snakemake (cluster nodes) re-parses this file but leaves them alone.
EXPERIMENTS = pm.write_resolved(config, write=workflow.is_main_process)
CELLS = {c.cell_id: c for c in pm.expand_cells(config)}
RECIPES = {v.recipe_id: v for v in pm.vision_recipes(config)}
EVAL_STAGES = config["eval_stages"]
TRAIN = {stage: pm.train_patterns(config, stage) for stage in pm.STAGES}
RES = config["resources"]
# The validated workflow config, written by write_resolved: plan_matrix and the onerror handler (Snakefile) read it.
WORKFLOW_FILE = pm.workflow_path(config)
PARTIAL_REPORT_LOG = f"logs/{NAME}/partial_report.log"


def _alternatives(values):
    return "|".join(re.escape(v) for v in sorted(values)) or "(?!)"


wildcard_constraints:
    cell=_alternatives(CELLS),
    recipe=_alternatives(RECIPES),
    resampler="[a-z][a-z0-9_]*",


def data_inputs():
    """The dataset files every training/eval job reads (produced by synth_data or prepare_data when configured)."""
    run = EXPERIMENTS[next(iter(EXPERIMENTS))]
    return [run["data"]["train_csv"], run["data"]["valid_csv"], run["data"]["test_csv"]]


def data_root():
    return EXPERIMENTS[next(iter(EXPERIMENTS))]["data"]["root"]


def data_fingerprint_file():
    return pm.data_fingerprint_path(config)


# With a `source:` block, prepare_data writes the CSVs named in run.data (checked here: they must be <root>/<split>.csv).
PREPARED = (
    pm.prepared_data_outputs(EXPERIMENTS[next(iter(EXPERIMENTS))]["data"])
    if config.get("source")
    else None
)


def published_csv_inputs():
    """The published CSVs of the `source:` block that are local files (URLs are fetched by the job)."""
    return pm.published_csv_inputs(config["source"])


def prepare_data_options():
    """prepare-data flags for the optional `source:` keys that are set (the CLI holds the defaults)."""
    return pm.prepare_data_options(config["source"])


def model_inputs():
    if config.get("tiny_models"):
        out = config["tiny_models"]["out"]
        return [f"{out}/vision/config.json", f"{out}/llm/config.json"]
    return []


def vision_input(cell_id):
    """A cell's stage-1 dependency: the recipe's completion marker (a `path` checkpoint must exist already)."""
    vis = CELLS[cell_id].vision
    if vis.kind == "train":
        return [pm.stage_marker(config, vis.recipe_id, pm.RECIPE_STAGE, vis.resampler)]
    if vis.kind == "path":
        return [vis.path]
    return []


def get_stage_marker(cell_id, stage):
    return pm.stage_marker(config, cell_id, stage, CELLS[cell_id].resampler)


def get_previous_stage_marker(cell_id, stage):
    """The marker of the stage whose checkpoint ``stage`` starts from (the stage table's ``previous``), if any."""
    previous = pm.STAGES[stage].previous
    return [get_stage_marker(cell_id, previous)] if previous else []


def get_generate_inputs(wildcards):
    inputs = {
        "cfg": pm.config_path(config, wildcards.cell),
        "data": data_inputs(),
        "models": model_inputs(),
        "vision": vision_input(wildcards.cell),
    }
    inputs["trained"] = sorted(
        {
            get_stage_marker(wildcards.cell, pm.EVAL_CHECKPOINT_STAGE[s])
            for s in EVAL_STAGES
            if pm.EVAL_CHECKPOINT_STAGE[s] is not None
        }
    )
    inputs["fingerprint"] = data_fingerprint_file()
    return inputs


def get_tiles_config(wildcards):
    """The resolved config of the first cell at this overlap (all cells share the rest of the geometry)."""
    cell = next(c for c in CELLS.values() if f"{c.overlap:.2f}" == wildcards.overlap)
    return pm.config_path(config, cell.cell_id)


def tiles_sheets():
    return [pm.tiles_sheet_path(config, o) for o in config["matrix"]["overlaps"]]


def tiles_args():
    return " ".join(
        f"{o}={shlex.quote(pm.tiles_sheet_path(config, o))}"
        for o in config["matrix"]["overlaps"]
    )


def all_predictions():
    """Every cell's predictions.csv for every evaluated stage (what the one score job reads)."""
    return [
        f"{pm.eval_dir(config, cid, s)}/predictions.csv"
        for cid in CELLS
        for s in EVAL_STAGES
    ]


def all_cell_outputs():
    outs = []
    for cid in CELLS:
        outs += [get_stage_marker(cid, s) for s in pm.TRAIN_STAGES]
        final = "metrics.json" if config["score"] else "generation.json"
        outs += [f"{pm.eval_dir(config, cid, s)}/{final}" for s in EVAL_STAGES]
    return outs


def get_final_output():
    return [
        f"{pm.report_dir(config)}/report.html",
        f"{pm.report_dir(config)}/results.csv",
    ]
