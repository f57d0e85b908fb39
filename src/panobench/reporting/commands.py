"""Subcommands of this concern (registered by panobench.cli): ``panobench aggregate`` and ``panobench report``."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    p = subparsers.add_parser("aggregate", help="collect every cell's records into one tidy results.csv")
    p.add_argument("--manifest", required=True, help="results/<name>/manifest.json (from `panobench plan`)")
    p.add_argument("--out", required=True, help="CSV to write, e.g. reports/<name>/results.csv "
                                                "(vision_recipes.csv is written beside it)")
    p.add_argument("--root", default=".", help="directory the manifest's paths are relative to (default: .)")
    p.set_defaults(func=aggregate_command)

    p = subparsers.add_parser("report", help="build the self-contained HTML comparison report")
    p.add_argument("--results", required=True, help="results.csv from `panobench aggregate`")
    p.add_argument("--manifest", required=True, help="results/<name>/manifest.json")
    p.add_argument("--out", required=True, help="report directory, e.g. reports/<name>")
    p.add_argument("--tiles", nargs="*", default=[], metavar="OVERLAP=PNG", help="tiling contact sheet per overlap")
    p.add_argument("--configs-dir", default=None, help="directory of <cell_id>.yaml (default: manifest's paths)")
    p.add_argument("--root", default=".", help="directory the manifest's paths are relative to (default: .)")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=report_command)


def aggregate_command(args: argparse.Namespace) -> int:
    from panobench.reporting.aggregate import aggregate

    results = aggregate(args.manifest, args.out, root=args.root)
    failed = int((results["status"] == "failed").sum())
    logger.info("%d cell x stage rows, %d failed", len(results), failed)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from panobench.reporting.html import build_report, parse_tiles

    out = build_report(args.results, args.manifest, args.out, tiles=parse_tiles(args.tiles),
                       configs_dir=args.configs_dir, title=args.title, root=args.root)
    logger.info("report: %s", out)
    return 0
