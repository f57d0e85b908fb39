"""Subcommands of this concern (registered by panobench.cli)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
