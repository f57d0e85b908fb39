"""Subcommands: ``plan`` (matrix manifest) and ``train`` (one stage).

The cells' resolved run configs are written when Snakemake builds the DAG (``panobench.matrix.write_resolved``),
not by a subcommand: each is built once, and the jobs read the file.
"""

from __future__ import annotations

import argparse

from panobench.config import STAGES, load_run_config
from panobench.utils.io import write_json_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plan", help="write the matrix manifest (cells, knobs, expected files)")
    p.add_argument("--workflow", required=True,
                   help="results/<name>/workflow.yaml (the validated workflow config, written when the DAG is built)")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=_plan)

    p = subparsers.add_parser("train", help="train one stage of one cell (resumes from last.ckpt)")
    p.add_argument("--config", required=True, help="resolved run config YAML")
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument("--resume", default=None,
                   help="stage 2: start from this stage-1 (vision) checkpoint (overrides vision.checkpoint)")
    p.add_argument("--run-dir", default=None, help="override the run directory (default: the seed's layout)")
    p.add_argument("--data-fingerprint", default=None,
                   help="data fingerprint JSON from `panobench fingerprint` to record (default: computed here)")
    p.set_defaults(func=_train)


def _plan(args: argparse.Namespace) -> int:
    from panobench.matrix import load_workflow_file, manifest

    write_json_atomic(args.out, manifest(load_workflow_file(args.workflow)))
    return 0


def _train(args: argparse.Namespace) -> int:
    from panobench.training.runner import train_stage

    cfg = load_run_config(args.config)
    train_stage(cfg, args.stage, resume=args.resume, run_dir=args.run_dir, data_fingerprint=args.data_fingerprint)
    return 0
