"""Contact sheet of a tiling: the ERP with each tile's true footprint, and the views the model sees."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from panobench.errors import InputError
from panobench.geometry.rays import _plane_to_world, rays_to_yaw_pitch
from panobench.geometry.render import GLOBAL_VIEW_MODE, render_views
from panobench.geometry.tiling import Tile, TilePlan
from panobench.utils.io import atomic_path

logger = logging.getLogger(__name__)

_BORDER_SAMPLES = 64  # points per tile edge: enough for the footprint's curvature to look smooth


def load_rgb_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: Image file (any format PIL reads).

    Returns:
        ``[H, W, 3]`` uint8 array.

    Raises:
        InputError: If the file is missing or cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}") from err


def tile_footprint(tile: Tile, height: int, width: int) -> list[np.ndarray]:
    """Outline of a tile on the ERP as polylines in pixel coordinates, split where it crosses the ±180° seam.

    Args:
        tile: The tile.
        height: ERP height in pixels.
        width: ERP width in pixels.

    Returns:
        Polylines, each ``[K, 2]`` of (x, y) pixel coordinates; none jumps across the whole image.
    """
    t = math.tan(math.radians(tile.fov_deg) / 2.0)
    edge = torch.linspace(-t, t, _BORDER_SAMPLES, dtype=torch.float64)
    # Walk the frustum border clockwise from the top-left corner (plane y is up; rows run top-down).
    a = torch.cat([edge, torch.full_like(edge, t), edge.flip(0), torch.full_like(edge, -t)])
    b = torch.cat([torch.full_like(edge, t), edge.flip(0), torch.full_like(edge, -t), edge])
    rays = torch.stack([_plane_to_world(tile, a[i : i + 1], -b[i : i + 1])[0, 0] for i in range(len(a))])
    yaw, pitch = rays_to_yaw_pitch(rays)
    x = ((yaw / (2 * math.pi) + 0.5) * width - 0.5).numpy()
    y = ((-pitch / math.pi + 0.5) * height - 0.5).numpy()
    breaks = np.nonzero(np.abs(np.diff(yaw.numpy())) > math.pi)[0] + 1
    return [np.stack([xs, ys], axis=1) for xs, ys in zip(np.split(x, breaks), np.split(y, breaks), strict=True)
            if len(xs) > 1]


def write_contact_sheet(erp: np.ndarray | torch.Tensor, plan: TilePlan, size: int, out_path: str | os.PathLike,
                        title: str | None = None, include_global: bool = True) -> Path:
    """Draw the tiling of one panorama: the ERP with tile footprints on top, the rendered views beneath.

    Args:
        erp: The panorama ``[H, W, 3]`` uint8.
        plan: Tile plan.
        size: Rendered view side in pixels.
        out_path: PNG to write (atomically).
        title: Figure title; default states FOV, nominal/effective overlap, tile and view counts.
        include_global: Also show the global view (as the model does when its geometry includes it).

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = erp.cpu().numpy() if isinstance(erp, torch.Tensor) else np.asarray(erp)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InputError(f"contact sheet needs an [H, W, 3] uint8 panorama, got {img.shape} {img.dtype}")
    h, w = img.shape[:2]
    views = render_views(torch.from_numpy(img).permute(2, 0, 1), plan, size,
                         include_global=include_global).permute(0, 2, 3, 1).numpy()
    n_views = views.shape[0]
    cols = min(n_views, max(plan.tiles_per_row, 3))
    rows = math.ceil(n_views / cols)
    colours = matplotlib.colormaps["tab10" if plan.num_tiles <= 10 else "tab20"]

    fig_w = 2.2 * cols
    erp_h = fig_w * h / w
    fig = plt.figure(figsize=(fig_w, erp_h + 2.4 * rows + 0.8))
    gs = fig.add_gridspec(1 + rows, cols, height_ratios=[erp_h] + [2.2] * rows)
    ax = fig.add_subplot(gs[0, :])
    ax.imshow(img, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    for tile in plan.tiles:
        colour = colours(tile.index % colours.N)
        for line in tile_footprint(tile, h, w):
            ax.plot(line[:, 0], line[:, 1], color=colour, linewidth=1.5)
        cx = (math.radians(_wrap_deg(tile.yaw_deg)) / (2 * math.pi) + 0.5) * w - 0.5
        cy = (-math.radians(tile.pitch_deg) / math.pi + 0.5) * h - 0.5
        # A tile centred on the seam gets its label at both edges, where its two halves are.
        for x in (cx, -0.5) if abs(_wrap_deg(tile.yaw_deg)) == 180.0 else (cx,):
            ax.text(x, cy, str(tile.index), color="white", ha="center", va="center", fontsize=9, weight="bold",
                    bbox={"facecolor": colour, "alpha": 0.8, "pad": 1.5, "linewidth": 0})
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()

    for v in range(rows * cols):
        sub = fig.add_subplot(gs[1 + v // cols, v % cols])
        sub.set_axis_off()
        if v >= n_views:
            continue
        sub.imshow(views[v])
        if v < plan.num_tiles:
            tile = plan.tiles[v]
            sub.set_title(f"tile {v}: yaw {tile.yaw_deg:.1f}°, pitch {tile.pitch_deg:.0f}°", fontsize=7,
                          color=colours(v % colours.N))
        else:
            sub.set_title(f"global view ({GLOBAL_VIEW_MODE})", fontsize=7)

    if title is None:
        rows_text = f" in {len(plan.pitch_rows)} pitch rows" if len(plan.pitch_rows) > 1 else ""
        global_text = " + 1 global" if include_global else ", no global view"
        title = (f"anyres-e2p: FOV {plan.fov_deg:g}°, overlap {plan.nominal_overlap:g} nominal / "
                 f"{plan.effective_overlap:.3f} effective, {plan.num_tiles} tiles{rows_text}{global_text} = "
                 f"{plan.num_views(include_global)} views")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    with atomic_path(out_path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    logger.info("wrote contact sheet %s (%d views)", out_path, n_views)
    return out_path


def _wrap_deg(deg: float) -> float:
    """Angle in degrees mapped to (-180, 180]."""
    wrapped = (deg + 180.0) % 360.0 - 180.0
    return 180.0 if wrapped == -180.0 else wrapped
