"""Subcommands ``generate`` (model -> predictions.csv) and ``eval`` (generate + score) of the evaluation concern."""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from panobench.config import load_run_config
from panobench.errors import CheckpointError
from panobench.stages import EVAL_STAGE_NAMES, eval_stage_of, get_stage
from panobench.utils.io import read_json

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate one caption per (image, query) group -> predictions.csv")
    p.add_argument("--config", required=True, help="resolved run config YAML")
    p.add_argument("--stage", required=True, choices=EVAL_STAGE_NAMES, nargs="+",
                   help="baseline = untrained stage-2 start weights; resampler/finetune = that stage's best.ckpt; "
                        "blind = the finetuned model shown a constant grey panorama (several stages in one call "
                        "share the start-up cost)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file (default: the stage's best.ckpt, else last)")
    p.add_argument("--csv-input", default=None, help="CSV to caption (default: the config's test CSV)")
    p.add_argument("--out", required=True, nargs="+",
                   help="directory for predictions.csv and generation.json, one per --stage")
    p.add_argument("--data-fingerprint", default=None,
                   help="data fingerprint JSON from `panobench fingerprint` to record in generation.json")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("eval", help="evaluate a training run directory: generate + score")
    p.add_argument("--checkpoint-dir", required=True, help="runs/<exp>/<stage>/<crop>_<resampler>/")
    p.add_argument("--csv-input", default=None, help="CSV to caption (default: the config's test CSV)")
    p.add_argument("--out", default=None, help="output directory (default: <checkpoint-dir>/eval)")
    p.add_argument("--spice", choices=["auto", "on", "off"], default="auto")
    p.set_defaults(func=_eval)


def _generate(args: argparse.Namespace) -> int:
    from panobench.errors import ConfigError
    from panobench.evaluation.generate import generate_predictions

    if len(args.stage) != len(args.out):
        raise ConfigError(f"--stage names {len(args.stage)} stage(s) but --out {len(args.out)} directories")
    if args.checkpoint and len(args.stage) > 1:
        raise ConfigError("--checkpoint applies to a single --stage")
    cfg = load_run_config(args.config)
    for stage, out in zip(args.stage, args.out, strict=True):
        generate_predictions(cfg, stage, out, csv_input=args.csv_input, checkpoint=args.checkpoint,
                             data_fingerprint=args.data_fingerprint)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from panobench.evaluation.generate import find_checkpoint, generate_predictions
    from panobench.evaluation.predictions import score_predictions_file
    from panobench.models.checkpoint import run_workdir

    run_dir = Path(args.checkpoint_dir)
    meta_file = run_dir / "checkpoint_metadata.json"
    if not (run_dir / "config.yaml").is_file() or not meta_file.is_file():
        raise CheckpointError(f"{run_dir}: not a panobench run directory (needs config.yaml and "
                              "checkpoint_metadata.json)")
    cfg = load_run_config(run_dir / "config.yaml")
    meta = read_json(meta_file)
    stage = meta["stage"]
    eval_stage = eval_stage_of(stage)
    if eval_stage is None:
        raise CheckpointError(f"{run_dir}: a stage-{get_stage(stage).number} ({stage}) run has no language model "
                              "to caption with")
    out = Path(args.out) if args.out else run_dir / "eval"
    csv_input, checkpoint = args.csv_input, find_checkpoint(run_dir)
    # The config's relative paths (backbones, data, the stage-1 checkpoint) refer to the training run's working
    # directory, which the run directory names relative to itself: generate from there, wherever we are.
    workdir = run_workdir(cfg, meta, run_dir)
    if workdir is not None:
        out, checkpoint = out.absolute(), checkpoint.absolute()
        csv_input = str(Path(csv_input).absolute()) if csv_input else None
    with contextlib.chdir(workdir) if workdir is not None else contextlib.nullcontext():
        generate_predictions(cfg, eval_stage, out, csv_input=csv_input, checkpoint=checkpoint)
    score_predictions_file(out / "predictions.csv", out / "metrics.json", spice=args.spice)
    logger.info("wrote %s", out / "metrics.json")
    return 0
