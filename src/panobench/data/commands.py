"""Subcommands of this concern (registered by panobench.cli): ``synth``, ``fingerprint``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    p = subparsers.add_parser("synth", help="generate the seeded synthetic panorama dataset (QuIC-360 CSV format)")
    p.add_argument("--out", type=Path, required=True, help="output directory (new, empty, or an earlier synth output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=320, help="train images")
    p.add_argument("--n-valid", type=int, default=40, help="valid images")
    p.add_argument("--n-test", type=int, default=60, help="test images (4-6 references per image and query)")
    p.add_argument("--width", type=int, default=512, help="ERP width (must be 2 x height)")
    p.add_argument("--height", type=int, default=256, help="ERP height")
    p.set_defaults(func=_synth)

    p = subparsers.add_parser("fingerprint", help="hash a dataset (its CSVs and every image they name) -> JSON")
    p.add_argument("--csv", required=True, nargs="+", metavar="SPLIT=CSV", help="e.g. train=data/x/train.csv")
    p.add_argument("--root", required=True, help="data root the CSVs' image paths are relative to")
    p.add_argument("-o", "--out", required=True, help="JSON to write (atomically)")
    p.set_defaults(func=_fingerprint)


def _synth(args: argparse.Namespace) -> int:
    from panobench.data.synthetic import generate_synthetic  # lazy: keeps `panobench --help` fast

    summary = generate_synthetic(args.out, seed=args.seed, n_train=args.n_train, n_valid=args.n_valid,
                                 n_test=args.n_test, width=args.width, height=args.height)
    logger.info("wrote %s: images %s, CSV rows %s, (image, query) groups %s", summary.out_dir, summary.images,
                summary.rows, summary.groups)
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    from panobench.data.fingerprint import dataset_fingerprint
    from panobench.errors import ConfigError
    from panobench.utils.io import write_json_atomic

    csvs = {}
    for item in args.csv:
        split, sep, path = item.partition("=")
        if not sep or not split or not path:
            raise ConfigError(f"--csv expects SPLIT=CSV (e.g. train=data/x/train.csv), got {item!r}")
        csvs[split] = path
    record = dataset_fingerprint(csvs, args.root)
    write_json_atomic(args.out, record)
    logger.info("data fingerprint %s (%d images) -> %s", record["fingerprint"], record["num_images"], args.out)
    return 0
