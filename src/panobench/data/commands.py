"""Subcommands of this concern (registered by panobench.cli): ``synth``."""

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


def _synth(args: argparse.Namespace) -> int:
    from panobench.data.synthetic import generate_synthetic  # lazy: keeps `panobench --help` fast

    summary = generate_synthetic(args.out, seed=args.seed, n_train=args.n_train, n_valid=args.n_valid,
                                 n_test=args.n_test, width=args.width, height=args.height)
    logger.info("wrote %s: images %s, CSV rows %s, (image, query) groups %s", summary.out_dir, summary.images,
                summary.rows, summary.groups)
    return 0
