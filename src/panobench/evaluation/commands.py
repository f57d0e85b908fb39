"""Subcommand ``score`` (predictions.csv -> metrics.json) of the evaluation concern, registered by panobench.cli;
``generate`` and ``eval`` are in :mod:`panobench.evaluation.eval_commands`."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    _register_score(subparsers)


def _register_score(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score a predictions.csv into metrics.json (pycocoevalcap, grouped refs)")
    p.add_argument("--predictions", required=True, nargs="+",
                   help="predictions CSV(s) (sample_id,image,query,prediction,references)")
    p.add_argument("--out", required=True, nargs="+",
                   help="metrics.json to write, one per predictions CSV (several in one call share one METEOR "
                        "process, whose start-up dominates small evaluations)")
    p.add_argument("--spice", choices=["auto", "on", "off"], default="auto",
                   help="auto: SPICE if its CoreNLP jars are present locally ($PANOBENCH_SPICE_LIB, else "
                        "pycocoevalcap's spice/lib; else null + reason); on: required")
    p.set_defaults(func=_score)


def _score(args: argparse.Namespace) -> int:
    from panobench.errors import ConfigError
    from panobench.evaluation.predictions import score_predictions_files

    if len(args.predictions) != len(args.out):
        raise ConfigError(f"--predictions names {len(args.predictions)} file(s) but --out {len(args.out)}")
    score_predictions_files(list(zip(args.predictions, args.out, strict=True)), spice=args.spice)
    return 0
