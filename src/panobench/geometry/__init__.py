"""anyres-e2p geometry: tile plans, the perspective renderer, per-token rays and the tiling contact sheet."""

from panobench.geometry.rays import (
    Correspondence,
    ViewGeometry,
    dedupe_keep_mask,
    pool_geometry,
    tile_correspondences,
    view_geometry,
)
from panobench.geometry.render import GLOBAL_VIEW_MODE, render_global, render_tiles, render_views
from panobench.geometry.tiling import Tile, TilePlan, plan_tiles

__all__ = [
    "GLOBAL_VIEW_MODE",
    "Correspondence",
    "Tile",
    "TilePlan",
    "ViewGeometry",
    "dedupe_keep_mask",
    "plan_tiles",
    "pool_geometry",
    "render_global",
    "render_tiles",
    "render_views",
    "tile_correspondences",
    "view_geometry",
]
