"""Per-token ray geometry of the anyres-e2p views: the one place where directions on the sphere are defined.

The positional encoding, token stitching/deduplication and the stage-1 correspondences all read token
directions from here, and the renderer uses the same camera model, so the ray of a tile pixel is exactly the
ERP direction it samples (SPEC §2 items 1, 8, 9).

3-D convention (right-handed is not needed, only consistency):
    x points right (yaw +90°), y points up (the zenith), z points forward (yaw 0°, the ERP's centre column).
    yaw = atan2(x, z) in (-π, π], positive to the right; pitch = asin(y) in [-π/2, π/2], positive up.
    ERP column ``i`` of ``W`` has its centre at yaw ``((i + 0.5)/W - 0.5)·2π``; row ``j`` of ``H`` at pitch
    ``(0.5 - (j + 0.5)/H)·π`` — the same as py360convert.

Tile cameras are square pinholes: a point ``(a, b)`` of the image plane (``a`` right, ``b`` up, both in
``[-tan(fov/2), tan(fov/2)]``) has camera ray ``(a, b, 1)``, turned by ``R = R_yaw · R_pitch``. Pixel centres of
an ``S``-pixel tile sit at ``linspace(-tan(fov/2), tan(fov/2), S)`` (edge pixels centred *on* the frustum border),
which is py360convert's ``e2p`` convention.

Token ``n`` of a ``grid × grid`` patch grid is the row-major patch index ``n = row·grid + col`` (row 0 at the top),
its ray passes through the patch centre.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace

import torch

from panobench.geometry.tiling import Tile, TilePlan

logger = logging.getLogger(__name__)

_TIE_EPS = 1e-9  # dot-product slack under which two tile axes count as equally near (float64)


# --------------------------------------------------------------------------------------------------- camera math
def tile_rotation(tile: Tile) -> torch.Tensor:
    """Camera-to-world rotation of a tile: ``R = R_yaw @ R_pitch``, float64 ``[3, 3]``."""
    yaw, pitch = math.radians(tile.yaw_deg), math.radians(tile.pitch_deg)
    cy, sy, cp, sp = math.cos(yaw), math.sin(yaw), math.cos(pitch), math.sin(pitch)
    r_yaw = torch.tensor([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]], dtype=torch.float64)
    r_pitch = torch.tensor([[1.0, 0.0, 0.0], [0.0, cp, sp], [0.0, -sp, cp]], dtype=torch.float64)
    return r_yaw @ r_pitch


def tile_axes(plan: TilePlan) -> torch.Tensor:
    """Optical axes (unit, world frame) of the plan's tiles, float64 ``[T, 3]``."""
    return torch.stack([tile_rotation(t)[:, 2] for t in plan.tiles])


def plane_coords(fov_deg: float, count: int, size: int | None = None) -> torch.Tensor:
    """Image-plane coordinates of ``count`` evenly spaced sample centres across a tile, float64 ``[count]``.

    Args:
        fov_deg: Tile field of view.
        count: Number of samples (pixels when ``size`` is None and count is the pixel count, else patches).
        size: If given, the tile's pixel size; ``count`` then divides it and the coordinates are the centres
            of ``size // count``-pixel patches under the renderer's pixel convention. If None, ``count``
            cells split the plane ``[-t, t]`` evenly (the size-independent limit).
    """
    t = math.tan(math.radians(fov_deg) / 2.0)
    idx = torch.arange(count, dtype=torch.float64)
    if size is None:
        return -t + 2.0 * t * (idx + 0.5) / count
    if size % count:
        raise ValueError(f"tile size {size} is not divisible by the patch grid {count}")
    centre_px = (idx + 0.5) * (size // count) - 0.5
    return -t + 2.0 * t * centre_px / max(size - 1, 1)


def tile_pixel_rays(tile: Tile, size: int) -> torch.Tensor:
    """World rays of every pixel centre of a rendered ``size × size`` tile, float64 ``[size, size, 3]``.

    Not unit length (``z_cam = 1``); the renderer only needs directions.
    """
    t = math.tan(math.radians(tile.fov_deg) / 2.0)
    coords = torch.linspace(-t, t, size, dtype=torch.float64)
    return _plane_to_world(tile, coords, coords)


def _plane_to_world(tile: Tile, a: torch.Tensor, b_top_down: torch.Tensor) -> torch.Tensor:
    """Rays ``[len(b), len(a), 3]`` through plane points ``(a_j, -b_i)``: rows run top to bottom."""
    bb, aa = torch.meshgrid(-b_top_down, a, indexing="ij")
    cam = torch.stack([aa, bb, torch.ones_like(aa)], dim=-1)
    return cam @ tile_rotation(tile).T


def rays_to_yaw_pitch(rays: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Yaw in (-π, π] and pitch in [-π/2, π/2] of rays ``[..., 3]`` (any length)."""
    x, y, z = rays.unbind(-1)
    yaw = torch.atan2(x, z)
    yaw = torch.where(yaw <= -math.pi, yaw + 2.0 * math.pi, yaw)  # keep the half-open range (-π, π]
    pitch = torch.atan2(y, torch.hypot(x, z))
    return yaw, pitch


def yaw_pitch_to_rays(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """Unit rays ``[..., 3]`` from yaw/pitch in radians."""
    cp = torch.cos(pitch)
    return torch.stack([cp * torch.sin(yaw), torch.sin(pitch), cp * torch.cos(yaw)], dim=-1)


# --------------------------------------------------------------------------------------------------- view geometry
@dataclass(frozen=True)
class ViewGeometry:
    """Token directions of every view of one plan (tiles in plan order, then the global view).

    Attributes:
        rays: Unit rays, float32 ``[V, N, 3]`` with ``N = grid**2`` (row-major patch index).
        yaw: Yaw of each ray in radians, in (-π, π], float32 ``[V, N]``.
        pitch: Pitch of each ray in radians, float32 ``[V, N]``.
        is_global: Whether each view is the global (whole-ERP, squashed) view, bool ``[V]``.
        grid: Tokens per side of each view.
        plan: The tile plan the geometry was derived from.

    Instances are cached and shared: treat the tensors as read-only.
    """

    rays: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor
    is_global: torch.Tensor
    grid: int
    plan: TilePlan

    @property
    def num_views(self) -> int:
        return self.rays.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.rays.shape[1]


@functools.lru_cache(maxsize=64)
def view_geometry(plan: TilePlan, grid: int, include_global: bool = True, size: int | None = None) -> ViewGeometry:
    """Ray through each patch centre of each view.

    Args:
        plan: The tile plan.
        grid: Patches per side (e.g. 16 for a 256-pixel SigLIP/16 input).
        include_global: Append the global view's tokens as the last view.
        size: Rendered tile size in pixels. If given, patch centres follow the renderer's pixel grid exactly
            (mean of the patch's pixel centres); if None, the size-independent limit is used — these differ
            by a fraction of a pixel (0.2 px at 256/16) and both are valid for PE and matching.

    Returns:
        The geometry, ``V = plan.num_views(include_global)`` views of ``grid**2`` tokens.
    """
    if grid < 1:
        raise ValueError(f"patch grid must be >= 1, got {grid}")
    per_view = []
    for tile in plan.tiles:
        coords = plane_coords(tile.fov_deg, grid, size)
        per_view.append(_plane_to_world(tile, coords, coords).reshape(-1, 3))
    if include_global:
        per_view.append(_global_rays(grid))
    rays = torch.stack(per_view)
    rays = rays / rays.norm(dim=-1, keepdim=True)
    return _geometry_from_rays(rays, plan, grid, include_global)


def _global_rays(grid: int) -> torch.Tensor:
    """Rays of the global view's patch centres under the squash mapping (whole ERP -> square), ``[grid², 3]``."""
    frac = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    yaw = (frac - 0.5) * 2.0 * math.pi
    pitch = (0.5 - frac) * math.pi
    pp, yy = torch.meshgrid(pitch, yaw, indexing="ij")
    return yaw_pitch_to_rays(yy, pp).reshape(-1, 3)


def _geometry_from_rays(rays64: torch.Tensor, plan: TilePlan, grid: int, include_global: bool) -> ViewGeometry:
    yaw, pitch = rays_to_yaw_pitch(rays64)
    is_global = torch.zeros(rays64.shape[0], dtype=torch.bool)
    if include_global:
        is_global[-1] = True
    return ViewGeometry(rays=rays64.float(), yaw=yaw.float(), pitch=pitch.float(), is_global=is_global,
                        grid=grid, plan=plan)


def pool_geometry(geom: ViewGeometry, factor: int) -> ViewGeometry:
    """Geometry of the tokens left after ``factor × factor`` average pooling of each view's token grid.

    Each pooled token's ray is the renormalised mean of the rays it pools. Where those rays cancel out (the global
    view pooled to a single token sees the whole sphere: its rays average to zero), the ray of the window's centre
    patch stands in, so the geometry stays finite.

    Args:
        geom: Geometry at the encoder's patch grid.
        factor: Pooling window and stride; must divide ``geom.grid``.

    Returns:
        Geometry with ``grid = geom.grid // factor``.
    """
    if factor < 1 or geom.grid % factor:
        raise ValueError(f"pooling factor {factor} must be >= 1 and divide the token grid {geom.grid}")
    if factor == 1:
        return geom
    v, g, k = geom.num_views, geom.grid, factor
    windows = geom.rays.double().reshape(v, g // k, k, g // k, k, 3)
    mean = windows.mean(dim=(2, 4))
    centre = windows[:, :, k // 2, :, k // 2, :]
    norm = mean.norm(dim=-1, keepdim=True)
    rays = torch.where(norm > 1e-6, mean / norm.clamp_min(1e-12), centre / centre.norm(dim=-1, keepdim=True))
    rays = rays.reshape(v, -1, 3)
    pooled = _geometry_from_rays(rays, geom.plan, g // k, bool(geom.is_global.any()))
    return replace(pooled, is_global=geom.is_global.clone())


# --------------------------------------------------------------------------------------------------- correspondences
@dataclass(frozen=True)
class Correspondence:
    """Token pairs of two neighbouring tiles that look in (almost) the same direction.

    Attributes:
        view_a: View index of tile A (plan order).
        view_b: View index of tile B.
        idx_a: Token indices in A, int64 ``[M]``.
        idx_b: Matching token indices in B, int64 ``[M]`` (``M`` may be 0 when the tiles do not overlap).
    """

    view_a: int
    view_b: int
    idx_a: torch.Tensor
    idx_b: torch.Tensor

    @property
    def num_pairs(self) -> int:
        return int(self.idx_a.numel())


def half_patch_angle(fov_deg: float, grid: int) -> float:
    """Half the angular size (radians) of one patch at the tile centre: ``atan(tan(fov/2) / grid)``."""
    return math.atan(math.tan(math.radians(fov_deg) / 2.0) / grid)


def neighbour_pairs(plan: TilePlan) -> list[tuple[int, int]]:
    """Neighbouring tile pairs: yaw neighbours in each row (incl. the wrap pair last -> first), then the tile
    at the same yaw index in the next row (rows taken in ascending pitch)."""
    n = plan.tiles_per_row
    pairs: list[tuple[int, int]] = []
    seen: set[frozenset[int]] = set()

    def add(a: int, b: int) -> None:
        key = frozenset((a, b))
        if a != b and key not in seen:
            seen.add(key)
            pairs.append((a, b))

    for r in range(len(plan.pitch_rows)):
        for k in range(n):
            add(r * n + k, r * n + (k + 1) % n)
    order = sorted(range(len(plan.pitch_rows)), key=lambda r: plan.pitch_rows[r])
    for r0, r1 in zip(order, order[1:], strict=False):
        for k in range(n):
            add(r0 * n + k, r1 * n + k)
    return pairs


def match_tokens(plan: TilePlan, grid: int, view_a: int, view_b: int) -> Correspondence:
    """Pair each token of tile A with the nearest-ray token of tile B, if inside B's frustum and within half a
    patch (see :func:`half_patch_angle`)."""
    geom = view_geometry(plan, grid, include_global=False)
    rays = geom.rays.double()
    ray_a, ray_b = rays[view_a], rays[view_b]
    tile_b = plan.tiles[view_b]
    # A's rays in B's camera frame: inside the true frustum iff in front and |x/z|, |y/z| <= tan(fov/2).
    cam = ray_a @ tile_rotation(tile_b)
    t = math.tan(math.radians(tile_b.fov_deg) / 2.0)
    z = cam[:, 2]
    inside = (z > 0) & (cam[:, 0].abs() <= t * z + 1e-12) & (cam[:, 1].abs() <= t * z + 1e-12)
    best_dot, best_b = (ray_a @ ray_b.T).max(dim=1)
    close = best_dot >= math.cos(half_patch_angle(tile_b.fov_deg, grid)) - 1e-12
    keep = inside & close
    idx_a = torch.nonzero(keep).flatten()
    return Correspondence(view_a=view_a, view_b=view_b, idx_a=idx_a, idx_b=best_b[keep])


@functools.lru_cache(maxsize=64)
def _tile_correspondences(plan: TilePlan, grid: int) -> tuple[Correspondence, ...]:
    return tuple(match_tokens(plan, grid, a, b) for a, b in neighbour_pairs(plan))


def tile_correspondences(plan: TilePlan, grid: int) -> list[Correspondence]:
    """Geometric token correspondences for every pair of neighbouring tiles (global view never included).

    A token of A is paired with the token of B whose ray is nearest, accepted only if A's ray lies inside B's
    true frustum and the angle is at most half a patch. Pairs are listed as returned by
    :func:`neighbour_pairs`, including pairs with no matches (``M = 0``, e.g. at overlap 0).

    Args:
        plan: The tile plan.
        grid: Tokens per side of each tile.

    Returns:
        One :class:`Correspondence` per neighbouring pair (cached; tensors are shared, treat as read-only).
    """
    return list(_tile_correspondences(plan, grid))


def dedupe_keep_mask(geom: ViewGeometry) -> torch.Tensor:
    """Which tokens to keep so each direction is represented once among the tiles.

    A tile token is kept iff its tile's optical axis is the nearest (largest dot product) of all tile axes to
    the token's ray, ties going to the lower tile index. Global-view tokens are always kept.

    Args:
        geom: View geometry (tiles first, then optionally the global view).

    Returns:
        Bool mask ``[V, N]``.
    """
    axes = tile_axes(geom.plan)                                     # [T, 3]
    dots = geom.rays.double() @ axes.T                              # [V, N, T]
    best = dots.max(dim=-1, keepdim=True).values
    # The first tile whose axis is (within float slack) as near as the best one owns the direction.
    owner = (dots >= best - _TIE_EPS).int().argmax(dim=-1)          # [V, N]
    view_idx = torch.arange(geom.num_views).unsqueeze(1)
    return (owner == view_idx) | geom.is_global.unsqueeze(1)
