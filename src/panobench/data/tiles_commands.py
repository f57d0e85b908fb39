"""Subcommand ``panobench tiles`` (registered by panobench.cli): a panorama's tiling as a contact sheet.

It lives with the data concern, not in geometry, because it may read its panorama from a dataset CSV.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    p = subparsers.add_parser("tiles", help="draw the anyres-e2p tiling of a panorama as a contact sheet")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("panorama", nargs="?", help="equirectangular image (2:1)")
    src.add_argument("--from-csv", help="use the first image of this QuIC-360 CSV instead")
    p.add_argument("--data-root", default=None, help="data root of --from-csv (default: the CSV's folder)")
    p.add_argument("--overlap", type=float, default=0.5, help="nominal yaw overlap in [0, 1) (default 0.5)")
    p.add_argument("--fov", type=float, default=90.0, help="tile field of view in degrees (default 90)")
    p.add_argument("--pitch-rows", type=float, nargs="+", default=[0.0], help="pitch of each tile row (deg)")
    p.add_argument("--size", type=int, default=256, help="rendered view side in pixels (default 256)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.set_defaults(func=tiles_command)


def tiles_command(args: argparse.Namespace) -> int:
    from panobench.errors import ConfigError
    from panobench.geometry.sheet import load_rgb_image, write_contact_sheet
    from panobench.geometry.tiling import plan_tiles

    if args.size < 1:
        raise ConfigError(f"--size must be a positive number of pixels, got {args.size}")
    plan = plan_tiles(args.overlap, fov_deg=args.fov, pitch_rows=args.pitch_rows)
    if args.from_csv:
        from panobench.data.csvdata import read_quic_csv

        args.panorama = str(read_quic_csv(args.from_csv, args.data_root)["path"].iloc[0])
    erp = load_rgb_image(args.panorama)
    write_contact_sheet(erp, plan, args.size, args.output)
    return 0
