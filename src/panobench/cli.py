"""The one command-line interface that the workflow rules call: ``panobench <command> ...``.

Each concern contributes its subcommands through ``<concern>/commands.py:register(subparsers)``; every
subcommand's handler returns an exit code. Errors derived from :class:`PanobenchError` are printed as one
line and exit with status 2 (1 for anything unexpected, with the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from panobench import __version__
from panobench.errors import PanobenchError

logger = logging.getLogger("panobench")

# Modules that contribute subcommands, imported lazily so `panobench --help` stays fast.
COMMAND_MODULES = [
    "panobench.data.tiles_commands",   # tiles
    "panobench.data.commands",         # synth, prepare-data
    "panobench.models.commands",       # materialize
    "panobench.training.commands",     # plan, train
    "panobench.evaluation.commands",   # score
    "panobench.evaluation.eval_commands",  # generate, eval
    "panobench.reporting.commands",    # aggregate, report, partial-report, compare, bill
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="panobench", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"panobench {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except PanobenchError as err:
        print(f"panobench {args.command}: error: {err}", file=sys.stderr)
        return 2
