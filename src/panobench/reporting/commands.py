"""Subcommands of this concern (registered by panobench.cli): ``aggregate``, ``report``, ``partial-report``,
``compare`` and ``bill``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

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
    p.add_argument("--root", default=".", help="directory the manifest's paths are relative to (default: .)")
    p.set_defaults(func=report_command)

    p = subparsers.add_parser("partial-report",
                              help="after a failed run (snakemake --keep-going): score the finished predictions, "
                                   "aggregate and build the report, failed cells listed as failed")
    p.add_argument("--workflow", required=True,
                   help="results/<name>/workflow.yaml (the validated workflow config, written when the DAG is built)")
    p.add_argument("--log", required=True, help="file for the details; the console gets one line naming the report")
    p.set_defaults(func=partial_report_command)
    register_checks(subparsers)


def aggregate_command(args: argparse.Namespace) -> int:
    from panobench.reporting.aggregate import aggregate

    results = aggregate(args.manifest, args.out, root=args.root)
    failed = int((results["status"] == "failed").sum())
    logger.info("%d cell x stage rows, %d failed", len(results), failed)
    return 0


def report_command(args: argparse.Namespace) -> int:
    from panobench.reporting.html import build_report, parse_tiles

    out = build_report(args.results, args.manifest, args.out, tiles=parse_tiles(args.tiles), root=args.root)
    logger.info("report: %s", out)
    return 0


def partial_report_command(args: argparse.Namespace) -> int:
    from panobench.matrix import load_workflow_file
    from panobench.reporting.partial import partial_report

    log_path = Path(args.log)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # The handler runs after Snakemake's own error summary: the details go to the log so that summary stays the
    # last thing on the console, followed by one line saying where the report (or the reason there is none) is.
    root = logging.getLogger()
    console = list(root.handlers)
    file_handler = logging.FileHandler(log_path, mode="w", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for handler in console:
        root.removeHandler(handler)
    root.addHandler(file_handler)
    try:
        html = partial_report(load_workflow_file(args.workflow))
    except Exception:
        logger.exception("could not build the partial report")
        print(f"panobench: could not build the partial report; see {log_path}")
        return 1
    finally:
        root.removeHandler(file_handler)
        file_handler.close()
        for handler in console:
            root.addHandler(handler)
    print(f"panobench: partial report with the failed cells listed: {html}")
    return 0


def register_checks(subparsers: argparse._SubParsersAction) -> None:
    """``panobench compare`` (reproduction check) and ``panobench bill`` (GPU-hours, measured and projected)."""
    from panobench.reporting.compare import DEFAULT_TOLERANCE

    p = subparsers.add_parser("compare", help="do two results.csv agree on the caption metrics? (exit 1 if not)")
    p.add_argument("results_a", metavar="RESULTS_A", help="results.csv of one run")
    p.add_argument("results_b", metavar="RESULTS_B", help="results.csv of the other run (same config)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"largest absolute difference of a caption metric that counts as equal (default "
                        f"{DEFAULT_TOLERANCE})")
    p.set_defaults(func=compare_command)

    p = subparsers.add_parser("bill", help="GPU-hours of a run's jobs; with --config, the projected cost of that "
                                           "config's matrix from the run's measured step times")
    p.add_argument("--results", required=True, help="results.csv of the measured run (vision_recipes.csv and "
                                                    "jobs.csv beside it are read when present)")
    p.add_argument("--config", default=None, help="workflow config whose matrix to project, e.g. config/quic360.yaml")
    p.add_argument("--test-samples", type=int, default=None,
                   help="test samples per eval stage of the target (default: as many as the measured run had)")
    p.add_argument("--scale-batch", action="store_true",
                   help="match training across batch sizes, scaling step time linearly with the batch")
    p.add_argument("--budget-hours", type=float, default=None, help="exit 1 when the projection exceeds it")
    p.add_argument("--out", default=None, help="CSV of the projected jobs (one row per job)")
    p.set_defaults(func=bill_command)


def compare_command(args: argparse.Namespace) -> int:
    from panobench.reporting.compare import compare_results, summary_line

    result = compare_results(args.results_a, args.results_b, args.tolerance)
    for line in result.notes:
        print(f"note: {line}")
    for line in result.lines:
        print(line)
    print(summary_line(result))
    return 1 if result.differs else 0


def bill_command(args: argparse.Namespace) -> int:
    from panobench.reporting.aggregate import write_csv_atomic
    from panobench.reporting.bill import (
        load_workflow_config,
        measured_by_rule,
        project_matrix,
        read_measured,
    )

    results, recipes, jobs = read_measured(args.results)
    measured = measured_by_rule(jobs)
    print(f"measured ({args.results}):")
    print(measured.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"GPU-hours measured: {measured['gpu_hours'].sum():.3f}")
    if args.config is None:
        return 0
    projection = project_matrix(results, recipes, load_workflow_config(args.config),
                                test_samples=args.test_samples, scale_batch=args.scale_batch)
    devices = ", ".join(str(d) for d in results["device"].dropna().unique()) if "device" in results else "?"
    print(f"\nprojected cost of {args.config} (matrix {projection.config!r}) from the step times measured on "
          f"{devices or '?'}:")
    print(projection.by_rule().to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for note in projection.notes:
        print(f"note: {note}")
    for line in projection.missing:
        print(f"not projected: {line}")
    total = projection.gpu_hours
    status = "incomplete: " if projection.missing else ""
    budget = ""
    over = args.budget_hours is not None and total > args.budget_hours
    if args.budget_hours is not None:
        budget = f" (budget {args.budget_hours:g}: {'OVER' if over else 'within'})"
    print(f"GPU-hours projected: {status}{total:.3f}{budget}")
    if args.out:
        write_csv_atomic(projection.jobs, args.out)
    return 1 if projection.missing or over else 0
