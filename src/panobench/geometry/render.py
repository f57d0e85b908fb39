"""Batched ERP -> perspective tile renderer (torch ``grid_sample``, bilinear), plus the global view.

Conventions match ``py360convert.e2p(e_img, fov_deg, u_deg, v_deg, out_hw, mode="bilinear")`` with ``u`` = tile yaw
(positive right) and ``v`` = tile pitch (positive up); camera model in :mod:`panobench.geometry.rays`. Like
py360convert, the ERP is padded by one pixel on every side before sampling — columns wrap around the ±180° seam
and the top/bottom rows continue over the pole (the row rolled by half a turn) — so tiles straddling the seam or
reaching a pole have no black border.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.nn.functional as F

from panobench.errors import InputError
from panobench.geometry.rays import rays_to_yaw_pitch, tile_pixel_rays
from panobench.geometry.tiling import TilePlan

logger = logging.getLogger(__name__)

GLOBAL_VIEW_MODE = "squash"
"""How the global view is made: the whole ERP (2:1) is resized to ``size × size`` without keeping its aspect
ratio ("squash"), antialiased bilinear. Squash, not letterbox, so every token carries image content and the
global token geometry stays a plain lon/lat grid (see ``rays._global_rays``)."""


def _as_batch(erp: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if not isinstance(erp, torch.Tensor):
        raise InputError(f"ERP must be a torch.Tensor [B,C,H,W] or [C,H,W], got {type(erp).__name__}")
    if erp.ndim not in (3, 4):
        raise InputError(f"ERP must have shape [B,C,H,W] or [C,H,W], got {tuple(erp.shape)}")
    if erp.dtype != torch.uint8 and not erp.is_floating_point():
        raise InputError(f"ERP dtype must be uint8 or floating point, got {erp.dtype}")
    if erp.shape[-1] < 2 or erp.shape[-2] < 2:
        raise InputError(f"ERP must be at least 2x2 pixels, got {tuple(erp.shape)}")
    return (erp.unsqueeze(0), True) if erp.ndim == 3 else (erp, False)


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"view size must be a positive int, got {size!r}")


def _to_output_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint8:
        return x.round_().clamp_(0, 255).to(torch.uint8)
    return x.to(dtype)


def _pad_erp(erp: torch.Tensor, work_dtype: torch.dtype) -> torch.Tensor:
    """One-pixel wrap padding ``[B,C,H+2,W+2]``: columns wrap at the seam, rows continue over the poles."""
    b, c, h, w = erp.shape
    padded = erp.new_empty((b, c, h + 2, w + 2), dtype=work_dtype)
    padded[:, :, 1:-1, 1:-1] = erp
    # Beyond a pole lies the same latitude band half a turn away.
    padded[:, :, 0, 1:-1] = torch.roll(erp[:, :, 0], w // 2, dims=-1)
    padded[:, :, -1, 1:-1] = torch.roll(erp[:, :, -1], w // 2, dims=-1)
    padded[:, :, :, 0] = padded[:, :, :, -2]
    padded[:, :, :, -1] = padded[:, :, :, 1]
    return padded


@functools.lru_cache(maxsize=32)
def _tile_grid(plan: TilePlan, size: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """Normalised ``grid_sample`` coordinates into the padded ERP, float32 ``[1, T*size, size, 2]``.

    Pure geometry, computed in float64 once per (plan, size, ERP size, device).
    """
    rays = torch.stack([tile_pixel_rays(tile, size) for tile in plan.tiles])      # [T, S, S, 3]
    yaw, pitch = rays_to_yaw_pitch(rays)
    # ERP pixel coordinates (centres at integers), +1 for the padding; ranges [0.5, W+0.5] x [0.5, H+0.5].
    col = (yaw / (2.0 * math.pi) + 0.5) * width - 0.5 + 1.0
    row = (-pitch / math.pi + 0.5) * height - 0.5 + 1.0
    # align_corners=True: -1 / +1 are the centres of the first / last padded pixel.
    gx = col / (width + 1) * 2.0 - 1.0
    gy = row / (height + 1) * 2.0 - 1.0
    grid = torch.stack([gx, gy], dim=-1).reshape(1, len(plan.tiles) * size, size, 2)
    return grid.to(device=device, dtype=torch.float32)


def render_tiles(erp: torch.Tensor, plan: TilePlan, size: int) -> torch.Tensor:
    """Render every tile of the plan.

    Args:
        erp: Equirectangular image(s) ``[B, C, H, W]`` or ``[C, H, W]``, uint8 or float, any device.
        plan: Tile plan.
        size: Tile side in pixels.

    Returns:
        Tiles ``[B, T, C, size, size]`` (``[T, C, size, size]`` for unbatched input), same dtype and device as
        ``erp``; uint8 results are rounded to nearest.
    """
    _check_size(size)
    batch, unbatched = _as_batch(erp)
    b, c, h, w = batch.shape
    # Sample in float32 (float64 input stays float64): half precision would cost more than the 1-level budget.
    work_dtype = torch.float64 if batch.dtype == torch.float64 else torch.float32
    grid = _tile_grid(plan, size, h, w, batch.device).to(work_dtype)
    padded = _pad_erp(batch, work_dtype)
    out = F.grid_sample(padded, grid.expand(b, -1, -1, -1), mode="bilinear", padding_mode="border",
                        align_corners=True)                                       # [B, C, T*S, S]
    out = out.reshape(b, c, plan.num_tiles, size, size).transpose(1, 2)
    out = _to_output_dtype(out.contiguous(), batch.dtype)
    return out[0] if unbatched else out


def render_global(erp: torch.Tensor, size: int) -> torch.Tensor:
    """The global view: the whole ERP squashed to ``size × size`` (see :data:`GLOBAL_VIEW_MODE`).

    Args:
        erp: ``[B, C, H, W]`` or ``[C, H, W]``, uint8 or float.
        size: Output side in pixels.

    Returns:
        ``[B, C, size, size]`` (``[C, size, size]`` unbatched), same dtype and device as ``erp``.
    """
    _check_size(size)
    batch, unbatched = _as_batch(erp)
    work = batch if batch.dtype == torch.float64 else batch.float()
    out = F.interpolate(work, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    out = _to_output_dtype(out, batch.dtype)
    return out[0] if unbatched else out


def render_views(erp: torch.Tensor, plan: TilePlan, size: int, include_global: bool = True) -> torch.Tensor:
    """All views the vision encoder sees: tiles in plan order, then (optionally) the global view last.

    Args:
        erp: ``[B, C, H, W]`` or ``[C, H, W]``, uint8 or float.
        plan: Tile plan.
        size: View side in pixels.
        include_global: Append the global view.

    Returns:
        ``[B, V, C, size, size]`` with ``V = plan.num_views(include_global)`` (no batch axis if unbatched input).
    """
    tiles = render_tiles(erp, plan, size)
    if not include_global:
        return tiles
    glob = render_global(erp, size)
    return torch.cat([tiles, glob.unsqueeze(-4)], dim=-4)
