"""Subcommand ``panobench tiles`` (registered by panobench.cli): a panorama's tiling as a contact sheet.

It lives with the data concern, not in geometry, because it may read its panorama from a dataset CSV.
"""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)

# Tiling flags of `panobench tiles` without --config, with their defaults (the run config's defaults).
_GEOMETRY_DEFAULTS = {"overlap": 0.5, "fov": 90.0, "pitch_rows": [0.0]}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this concern's subcommands."""
    p = subparsers.add_parser("tiles", help="draw the anyres-e2p tiling of a panorama as a contact sheet",
                              description="Draw the views a model sees: with --config, exactly the tiling of that "
                                          "resolved run config (overlap, fov, pitch rows, global view) on the "
                                          "first image of its test CSV (or on PANORAMA); without, the tiling the "
                                          "flags describe.")
    p.add_argument("panorama", nargs="?", help="equirectangular image (2:1); default with --config: the first "
                                               "image of the config's test CSV")
    p.add_argument("--config", default=None, help="resolved run config YAML whose geometry to draw")
    p.add_argument("--overlap", type=float, default=None,
                   help=f"nominal yaw overlap in [0, 1) (default {_GEOMETRY_DEFAULTS['overlap']}; not with --config)")
    p.add_argument("--fov", type=float, default=None,
                   help=f"tile field of view in degrees (default {_GEOMETRY_DEFAULTS['fov']:g}; not with --config)")
    p.add_argument("--pitch-rows", type=float, nargs="+", default=None,
                   help="pitch of each tile row in degrees (default 0; not with --config)")
    p.add_argument("--size", type=int, default=256, help="rendered view side in pixels (default 256)")
    p.add_argument("-o", "--output", required=True, help="PNG to write")
    p.set_defaults(func=tiles_command)


def tiles_command(args: argparse.Namespace) -> int:
    from panobench.errors import ConfigError
    from panobench.geometry.sheet import load_rgb_image, write_contact_sheet
    from panobench.geometry.tiling import plan_tiles

    if args.size < 1:
        raise ConfigError(f"--size must be a positive number of pixels, got {args.size}")
    flags = {k: getattr(args, k) for k in _GEOMETRY_DEFAULTS if getattr(args, k) is not None}
    panorama = args.panorama
    if args.config is not None:
        if flags:
            raise ConfigError(f"--config sets the tiling; drop {', '.join('--' + k.replace('_', '-') for k in flags)}")
        from panobench.config import load_run_config

        cfg = load_run_config(args.config)
        geometry = cfg.geometry
        plan = plan_tiles(geometry.overlap, fov_deg=geometry.fov, pitch_rows=geometry.pitch_rows)
        include_global = geometry.include_global
        if panorama is None:
            from panobench.data.csvdata import read_quic_csv

            panorama = str(read_quic_csv(cfg.data.test_csv, cfg.data.root)["path"].iloc[0])
    else:
        if panorama is None:
            raise ConfigError("name a PANORAMA image, or a resolved run config with --config")
        geometry = {**_GEOMETRY_DEFAULTS, **flags}
        plan = plan_tiles(geometry["overlap"], fov_deg=geometry["fov"], pitch_rows=geometry["pitch_rows"])
        include_global = True
    write_contact_sheet(load_rgb_image(panorama), plan, args.size, args.output, include_global=include_global)
    return 0
