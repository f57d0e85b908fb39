"""Subcommands: ``plan`` (matrix manifest), ``resolve-config`` (one cell's run config), ``train`` (one stage)."""

from __future__ import annotations

import argparse
import json

from panobench.config import STAGES, dump_run_config, load_run_config, run_config_from_dict
from panobench.errors import ConfigError
from panobench.utils.io import write_json_atomic


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("resolve-config", help="write the complete run config of one cell (strictly checked)")
    p.add_argument("--json", required=True, help="the cell's run config as JSON (from the workflow)")
    p.add_argument("-o", "--out", required=True)
    p.set_defaults(func=_resolve_config)

    p = subparsers.add_parser("plan", help="write the matrix manifest (cells, knobs, expected files)")
    p.add_argument("--workflow-json", required=True, help="the validated workflow config as JSON (from the Snakefile)")
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


def _resolve_config(args: argparse.Namespace) -> int:
    try:
        data = json.loads(args.json)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--json is not valid JSON: {err}") from None
    dump_run_config(run_config_from_dict(data), args.out)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from panobench.matrix import manifest

    try:
        wf = json.loads(args.workflow_json)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--workflow-json is not valid JSON: {err}") from None
    write_json_atomic(args.out, manifest(wf))
    return 0


def _train(args: argparse.Namespace) -> int:
    from panobench.training.runner import train_stage

    cfg = load_run_config(args.config)
    train_stage(cfg, args.stage, resume=args.resume, run_dir=args.run_dir, data_fingerprint=args.data_fingerprint)
    return 0
