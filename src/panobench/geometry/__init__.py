"""anyres-e2p geometry: tile plans, the perspective renderer, per-token rays and the tiling contact sheet.

Public names are re-exported lazily so that importing the CLI (``panobench.data.tiles_commands``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Correspondence": "rays",
    "ViewGeometry": "rays",
    "dedupe_keep_mask": "rays",
    "pool_geometry": "rays",
    "tile_correspondences": "rays",
    "view_geometry": "rays",
    "GLOBAL_VIEW_MODE": "render",
    "render_global": "render",
    "render_tiles": "render",
    "render_views": "render",
    "Tile": "tiling",
    "TilePlan": "tiling",
    "plan_tiles": "tiling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'panobench.geometry' has no attribute {name!r}")
    return getattr(importlib.import_module(f"panobench.geometry.{_EXPORTS[name]}"), name)
