# Load and check everything before any rule runs; every path and cell id comes from panobench.matrix.
import json
import re
import shlex
import subprocess
from pathlib import Path

from snakemake.utils import validate

from panobench import matrix as pm

validate(config, schema="../config/schema.yaml")

NAME = config["name"]
RUNS = pm.runs_root(config)
EXPERIMENTS = pm.experiments(
    config
)  # strict RunConfig validation of every cell: fails at DAG build time
CELLS = {c.cell_id: c for c in pm.expand_cells(config)}
RECIPES = {v.recipe_id: v for v in pm.vision_recipes(config)}
EVAL_STAGES = config["eval_stages"]
TRAIN = {stage: pm.train_patterns(config, stage) for stage in pm.STAGES}
RES = config["resources"]


def _alternatives(values):
    return "|".join(re.escape(v) for v in sorted(values)) or "(?!)"


wildcard_constraints:
    cell=_alternatives(CELLS),
    recipe=_alternatives(RECIPES),
    exp=_alternatives(EXPERIMENTS),
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


def get_resolved_json(wildcards):
    return json.dumps(EXPERIMENTS[wildcards.exp], sort_keys=True)


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


def unscored_predictions():
    """predictions.csv files whose generation finished (generation.json written) but that have no metrics.json."""
    return [
        p
        for p in all_predictions()
        if Path(p).exists()
        and (Path(p).parent / "generation.json").exists()
        and not (Path(p).parent / "metrics.json").exists()
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


def report_after_failure():
    """onerror: score the cells that finished generating, then build the report (failed cells listed as failed).

    Runs the CLI directly with argument lists (no shell string, so config values are never re-parsed).
    """
    manifest = f"results/{NAME}/manifest.json"
    out = pm.report_dir(config)
    results = f"{out}/results.csv"
    tiles = [
        f"{o}={pm.tiles_sheet_path(config, o)}" for o in config["matrix"]["overlaps"]
    ]
    tiles = [t for t in tiles if Path(t.split("=", 1)[1]).exists()]
    log_path = Path(f"logs/{NAME}/report_after_failure.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    unscored = unscored_predictions() if config["score"] else []
    metrics = [str(Path(p).parent / "metrics.json") for p in unscored]
    steps = (
        [["panobench", "score", "--predictions", *unscored, "--out", *metrics]]
        if unscored
        else []
    )
    steps += [
        ["panobench", "plan", "--workflow-json", json.dumps(config), "-o", manifest],
        ["panobench", "aggregate", "--manifest", manifest, "--out", results],
        [
            "panobench",
            "report",
            "--results",
            results,
            "--manifest",
            manifest,
            "--out",
            out,
        ]
        + (["--tiles", *tiles] if tiles else []),
    ]
    with open(log_path, "w") as log:
        for cmd in steps:
            if (
                subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
                != 0
            ):
                print(f"panobench: could not build the partial report; see {log_path}")
                return
    print(f"panobench: partial report with the failed cells listed: {out}/report.html")
