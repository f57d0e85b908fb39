"""Token rays: agreement with the renderer, correspondences between neighbouring tiles, deduplication, pooling."""

import math
from dataclasses import replace

import pytest
import torch

from panobench.geometry.rays import (
    dedupe_keep_mask,
    half_patch_angle,
    match_tokens,
    neighbour_pairs,
    pool_geometry,
    tile_correspondences,
    tile_rotation,
    view_geometry,
    yaw_pitch_to_rays,
)
from panobench.geometry.render import render_views
from panobench.geometry.tiling import plan_tiles


def in_frustum(rays, tile, margin=0.0):
    """Whether world rays ``[N, 3]`` lie inside ``tile``'s frustum shrunk by ``margin`` (plane units)."""
    cam = rays.double() @ tile_rotation(tile)
    t = math.tan(math.radians(tile.fov_deg) / 2) - margin
    z = cam[:, 2]
    return (z > 0) & (cam[:, 0].abs() <= t * z) & (cam[:, 1].abs() <= t * z)


def test_shapes_ranges_and_unit_rays():
    plan = plan_tiles(0.5, pitch_rows=(0.0, 40.0))
    geom = view_geometry(plan, 8)
    assert geom.rays.shape == (17, 64, 3) and geom.rays.dtype == torch.float32
    assert geom.yaw.shape == geom.pitch.shape == (17, 64)
    assert torch.allclose(geom.rays.norm(dim=-1), torch.ones(17, 64), atol=1e-6)
    assert geom.is_global.tolist() == [False] * 16 + [True]
    assert (geom.yaw > -math.pi).all() and (geom.yaw <= math.pi).all()
    assert torch.allclose(yaw_pitch_to_rays(geom.yaw, geom.pitch), geom.rays, atol=1e-6)
    assert view_geometry(plan, 8, include_global=False).rays.shape == (16, 64, 3)


def test_token_order_is_row_major_and_matches_tile_pose():
    plan = plan_tiles(0.5, pitch_rows=(-20.0,))
    geom = view_geometry(plan, 4, include_global=False)
    for tile in plan.tiles:
        yaw, pitch = geom.yaw[tile.index].view(4, 4), geom.pitch[tile.index].view(4, 4)
        assert (pitch[:-1] > pitch[1:]).all()          # row 0 at the top
        rel = torch.remainder(yaw - math.radians(tile.yaw_deg) + math.pi, 2 * math.pi) - math.pi
        assert (rel[:, 1:] > rel[:, :-1]).all()         # yaw increases to the right
        mean_ray = geom.rays[tile.index].double().mean(0)
        axis = tile_rotation(tile)[:, 2]
        assert torch.allclose(mean_ray / mean_ray.norm(), axis, atol=1e-6)


def test_global_tokens_follow_the_squash_grid():
    geom = view_geometry(plan_tiles(0.0), 4)
    g_yaw, g_pitch = geom.yaw[-1].view(4, 4), geom.pitch[-1].view(4, 4)
    expected_yaw = torch.tensor([-135.0, -45.0, 45.0, 135.0]).deg2rad()
    expected_pitch = torch.tensor([67.5, 22.5, -22.5, -67.5]).deg2rad()
    assert torch.allclose(g_yaw, expected_yaw.expand(4, 4), atol=1e-6)
    assert torch.allclose(g_pitch, expected_pitch.unsqueeze(1).expand(4, 4), atol=1e-6)


def lonlat_erp(height=256, width=512):
    """Float ERP whose three channels encode (sin lon, cos lon, lat) at each pixel centre."""
    lon = ((torch.arange(width, dtype=torch.float64) + 0.5) / width - 0.5) * 2 * math.pi
    lat = (0.5 - (torch.arange(height, dtype=torch.float64) + 0.5) / height) * math.pi
    la, lo = torch.meshgrid(lat, lon, indexing="ij")
    return torch.stack([torch.sin(lo), torch.cos(lo), la])


@pytest.mark.parametrize("pitch_rows", [(0.0,), (-35.0, 30.0)])
def test_token_rays_match_what_the_renderer_samples(pitch_rows):
    plan = plan_tiles(0.5, fov_deg=80.0, pitch_rows=pitch_rows)
    grid, size = 4, 36  # 9-pixel patches: the patch centre is a pixel centre
    views = render_views(lonlat_erp(), plan, size)[:, :, 4::9, 4::9].reshape(plan.num_views(), 3, -1)
    yaw = torch.atan2(views[:, 0], views[:, 1])
    pitch = views[:, 2]
    # Exact pixel-grid centres (size given) vs the size-independent limit (off by < 1/2 pixel = 0.026 rad here).
    for geom, tol in ((view_geometry(plan, grid, size=size), 2e-3), (view_geometry(plan, grid), 3e-2)):
        tiles = slice(0, plan.num_tiles)
        d_yaw = torch.remainder(yaw[tiles] - geom.yaw[tiles] + math.pi, 2 * math.pi) - math.pi
        assert d_yaw.abs().max() < tol
        assert (pitch[tiles] - geom.pitch[tiles]).abs().max() < tol
    # Global view: resampling a 2:1 ERP to a square averages, so compare at a coarser tolerance.
    geom = view_geometry(plan, grid)
    d_yaw = torch.remainder(yaw[-1] - geom.yaw[-1] + math.pi, 2 * math.pi) - math.pi
    assert d_yaw.abs().max() < 0.05 and (pitch[-1] - geom.pitch[-1]).abs().max() < 0.05


def test_neighbour_pairs_include_the_wrap_and_vertical_neighbours():
    assert neighbour_pairs(plan_tiles(0.5)) == [(k, (k + 1) % 8) for k in range(8)]
    pairs = neighbour_pairs(plan_tiles(0.0, pitch_rows=(30.0, -30.0)))
    assert (3, 0) in pairs and (7, 4) in pairs
    assert {(4, 0), (5, 1), (6, 2), (7, 3)} <= set(pairs)  # rows sorted by pitch: -30 (row 1) below 30 (row 0)
    assert len(pairs) == 12


@pytest.mark.parametrize("grid", [8, 16])
def test_overlap_half_tokens_inside_the_overlap_have_partners(grid):
    plan = plan_tiles(0.5)
    geom = view_geometry(plan, grid, include_global=False)
    half = half_patch_angle(plan.fov_deg, grid)
    corrs = tile_correspondences(plan, grid)
    assert len(corrs) == 8
    for c in corrs:
        rays_a, rays_b = geom.rays[c.view_a].double(), geom.rays[c.view_b].double()
        inside = in_frustum(rays_a, plan.tiles[c.view_b])
        matched = torch.zeros(grid * grid, dtype=torch.bool)
        matched[c.idx_a] = True
        assert c.num_pairs >= 0.4 * grid * grid                   # neighbours at 0.5 share ~half a tile
        assert not (matched & ~inside).any()                        # only inside the true overlap
        # Nearly every token in the overlap finds a partner within half a patch; the few that do not sit where
        # B's (larger, rotated) patch grid puts them a little beyond half a patch -- but never beyond the
        # half-diagonal of a patch.
        assert matched.sum() >= 0.95 * inside.sum()
        nearest = (rays_a @ rays_b.T).max(dim=1).values.clamp(max=1.0).acos()
        assert (nearest[inside] <= math.sqrt(2) * half).all()
        angles = torch.acos((rays_a[c.idx_a] * rays_b[c.idx_b]).sum(-1).clamp(max=1.0))
        assert angles.max() <= half + 1e-6
        assert len(set(c.idx_a.tolist())) == c.num_pairs


def test_overlap_zero_has_no_pairs():
    plan = plan_tiles(0.0)
    geom = view_geometry(plan, 16, include_global=False)
    corrs = tile_correspondences(plan, 16)
    assert len(corrs) == 4 and all(c.num_pairs == 0 for c in corrs)
    for a, b in neighbour_pairs(plan):
        # No token centre of A lies inside B: the tiles only share their border. (Near the corners a token of A
        # can still be angularly close to one of B -- which is why the frustum test is needed.)
        assert not in_frustum(geom.rays[a], plan.tiles[b]).any()


@pytest.mark.parametrize("overlap", [0.25, 0.5])
def test_correspondences_are_roughly_symmetric(overlap):
    plan = plan_tiles(overlap)
    for c in tile_correspondences(plan, 16):
        back = match_tokens(plan, 16, c.view_b, c.view_a)
        assert c.num_pairs > 0
        assert abs(back.num_pairs - c.num_pairs) <= 0.1 * c.num_pairs


def test_correspondences_across_rows():
    plan = plan_tiles(0.5, pitch_rows=(0.0, 60.0))
    vertical = [c for c in tile_correspondences(plan, 8) if abs(c.view_a - c.view_b) == 8]
    assert len(vertical) == 8 and all(c.num_pairs > 0 for c in vertical)


def test_correspondences_are_cached():
    plan = plan_tiles(0.5)
    first, second = tile_correspondences(plan, 8), tile_correspondences(plan_tiles(0.5), 8)
    assert all(a is b for a, b in zip(first, second, strict=True))


def test_dedupe_keeps_everything_at_overlap_zero():
    geom = view_geometry(plan_tiles(0.0), 16)
    assert dedupe_keep_mask(geom).all()


def test_dedupe_keeps_fewer_and_still_covers_the_horizon_band():
    plan = plan_tiles(0.5)
    grid = 16
    geom = view_geometry(plan, grid)
    keep = dedupe_keep_mask(geom)
    assert keep[-1].all()                                          # global view always kept
    assert keep[:-1].sum() < plan.num_tiles * grid * grid
    assert keep[:-1].sum() > 2 * grid * grid                       # still a full 360° band
    # Each kept token belongs to the tile whose axis is nearest.
    kept_rays = geom.rays[:-1][keep[:-1]].double()
    gen = torch.Generator().manual_seed(0)
    yaw = (torch.rand(2000, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    pitch = (torch.rand(2000, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(30)
    probes = yaw_pitch_to_rays(yaw, pitch)
    nearest = (probes @ kept_rays.T).max(dim=1).values
    assert (nearest >= math.cos(2 * half_patch_angle(90.0, grid))).all()


def test_dedupe_ties_go_to_the_lower_tile():
    # Put the direction exactly between the axes of tiles 0 and 1 (yaw 45° at overlap 0) into both tiles.
    plan = plan_tiles(0.0)
    geom = view_geometry(plan, 2, include_global=False)
    bisector = yaw_pitch_to_rays(torch.tensor(math.pi / 4), torch.tensor(0.0))
    rays = geom.rays.clone()
    rays[0, 3] = bisector
    rays[1, 0] = bisector
    keep = dedupe_keep_mask(replace(geom, rays=rays))
    assert keep[0, 3] and not keep[1, 0]
    assert keep.sum() == 4 * 4 - 1


def test_pool_geometry():
    plan = plan_tiles(0.5)
    geom = view_geometry(plan, 16)
    pooled = pool_geometry(geom, 4)
    assert pooled.grid == 4 and pooled.rays.shape == (9, 16, 3)
    assert torch.allclose(pooled.rays.norm(dim=-1), torch.ones(9, 16), atol=1e-6)
    assert torch.equal(pooled.is_global, geom.is_global)
    # Pooled token (0, 0) of view 0 is the renormalised mean of the 4x4 block of fine rays.
    block = geom.rays[0].view(16, 16, 3)[:4, :4].reshape(-1, 3).double().mean(0)
    assert torch.allclose(pooled.rays[0, 0].double(), block / block.norm(), atol=1e-6)
    assert pool_geometry(geom, 1) is geom
    with pytest.raises(ValueError, match="divide"):
        pool_geometry(geom, 3)


def test_pooling_a_view_to_one_token_keeps_the_geometry_finite():
    # The global view sees the whole sphere: pooled to one token its rays average to zero, and a renormalised zero
    # vector was NaN (then every PE feature and every visual token of a tokens_per_view=1 model was NaN).
    geom = view_geometry(plan_tiles(0.0), 8)
    pooled = pool_geometry(geom, 8)
    assert pooled.rays.shape == (5, 1, 3)
    assert torch.isfinite(pooled.rays).all() and torch.isfinite(pooled.yaw).all() and torch.isfinite(pooled.pitch).all()
    assert torch.allclose(pooled.rays.norm(dim=-1), torch.ones(5, 1), atol=1e-6)
    # A tile's single token is still the renormalised mean of its rays (they do not cancel).
    mean = geom.rays[0].double().mean(0)
    assert torch.allclose(pooled.rays[0, 0].double(), mean / mean.norm(), atol=1e-6)
    # The global token falls back to the ray of its window's centre patch.
    centre = geom.rays[-1].view(8, 8, 3)[4, 4]
    assert torch.allclose(pooled.rays[-1, 0], centre / centre.norm(), atol=1e-6)
