"""Renderer: agreement with the py360convert oracle, dtypes, shapes, seam, global view."""

import numpy as np
import py360convert
import py360convert.utils
import pytest
import torch
import torch.nn.functional as F

from panobench.errors import InputError
from panobench.geometry.render import GLOBAL_VIEW_MODE, render_global, render_tiles, render_views
from panobench.geometry.tiling import Tile, TilePlan, plan_tiles


@pytest.fixture
def oracle(monkeypatch):
    """py360convert.e2p pinned to its scipy ``map_coordinates`` path (it silently uses cv2.remap if importable)."""
    monkeypatch.setattr(py360convert.utils, "cv2", None)
    cache = py360convert.utils.EquirecSampler.from_perspective
    cache.cache_clear()  # a sampler built before the pin could still hold the cv2 path
    yield py360convert.e2p
    cache.cache_clear()


def textured_erp(height=96, width=192, seed=0):
    """Smooth noise plus fine noise, uint8 ``[3, H, W]``: every sampling error shows up."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 8, width // 8, generator=gen) * 255
    erp = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    erp = erp + torch.randint(-25, 26, erp.shape, generator=gen)
    return erp.clamp(0, 255).round().to(torch.uint8)


def single_tile_plan(yaw, pitch, fov):
    return TilePlan(fov_deg=fov, nominal_overlap=0.0, effective_overlap=0.0, yaw_step_deg=360.0,
                    pitch_rows=(pitch,), tiles=(Tile(0, yaw, pitch, fov),))


@pytest.mark.parametrize(
    ("yaw", "pitch", "fov", "size"),
    [
        (0.0, 0.0, 90.0, 48),
        (180.0, 0.0, 90.0, 48),      # straddles the ±180° seam
        (-170.0, 15.0, 60.0, 40),    # straddles the seam from the other side, pitched up
        (135.0, -35.0, 100.0, 33),   # odd size, pitched down
        (45.0, 80.0, 90.0, 32),      # reaches over the north pole
    ],
)
def test_matches_py360convert_within_one_grey_level(oracle, yaw, pitch, fov, size):
    erp = textured_erp()
    ours = render_tiles(erp, single_tile_plan(yaw, pitch, fov), size)
    ref = oracle(erp.permute(1, 2, 0).numpy(), fov, yaw, pitch, (size, size), mode="bilinear")
    assert not py360convert.utils.EquirecSampler.from_perspective(
        np.deg2rad(fov), np.deg2rad(fov), -np.deg2rad(yaw), np.deg2rad(pitch), 0.0, 96, 192, size, size, 1
    )._use_cv2
    assert ours.shape == (1, 3, size, size) and ours.dtype == torch.uint8
    diff = np.abs(ours[0].permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
    assert diff.max() <= 1  # every pixel, border rows/columns included


def test_whole_plan_matches_oracle_tile_by_tile(oracle):
    erp = textured_erp(seed=1)
    plan = plan_tiles(0.5)
    tiles = render_tiles(erp, plan, 32)
    for tile in plan.tiles:
        ref = oracle(erp.permute(1, 2, 0).numpy(), tile.fov_deg, tile.yaw_deg, tile.pitch_deg, (32, 32))
        diff = np.abs(tiles[tile.index].permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
        assert diff.max() <= 1, f"tile {tile.index}"


def test_seam_is_seamless():
    # An ERP whose content is continuous across ±180°: a tile centred on the seam must be continuous too.
    h, w = 64, 128
    lon = (torch.arange(w) + 0.5) / w * 2 * torch.pi
    erp = (100 + 80 * torch.cos(lon)).expand(3, h, w).clone()
    tile = render_tiles(erp, single_tile_plan(180.0, 0.0, 90.0), 32)[0]
    row = tile[0, 16]
    assert tile.min() > 15  # no black column
    assert (row[1:] - row[:-1]).abs().max() < 15


def test_float_input_keeps_dtype_and_agrees_with_uint8():
    erp = textured_erp()
    plan = plan_tiles(0.25)
    as_uint8 = render_tiles(erp, plan, 24)
    as_float = render_tiles(erp.float() / 255.0, plan, 24)
    assert as_float.dtype == torch.float32
    assert (as_float * 255 - as_uint8.float()).abs().max() <= 0.5 + 1e-3
    as_double = render_tiles(erp.double(), plan, 24)
    assert as_double.dtype == torch.float64


def test_batched_shapes_order_and_global_last():
    erp = textured_erp()
    batch = torch.stack([erp, 255 - erp])
    plan = plan_tiles(0.5)
    views = render_views(batch, plan, 16)
    assert views.shape == (2, 9, 3, 16, 16) and views.dtype == torch.uint8
    assert torch.equal(views[:, :8], render_tiles(batch, plan, 16))
    assert torch.equal(views[:, 8], render_global(batch, 16))
    assert torch.equal(views[1, :8], render_tiles(255 - erp, plan, 16))
    assert render_views(erp, plan, 16, include_global=False).shape == (8, 3, 16, 16)


def test_global_view_is_squashed_whole_erp():
    assert GLOBAL_VIEW_MODE == "squash"
    h, w = 64, 128
    erp = torch.zeros(3, h, w, dtype=torch.uint8)
    erp[:, :, : w // 2] = 200  # western half bright
    glob = render_global(erp, 32)
    assert glob.shape == (3, 32, 32)
    assert (glob[:, :, :15] == 200).all() and (glob[:, :, 17:] == 0).all()  # the full width is kept


def test_output_follows_input_device():
    erp = textured_erp().to(torch.device("cpu"))
    out = render_views(erp, plan_tiles(0.0), 16)
    assert out.device == erp.device


@pytest.mark.parametrize(
    "bad", [torch.zeros(96, 192), torch.zeros(1, 1, 3, 8, 16), torch.zeros(3, 8, 16, dtype=torch.int32)]
)
def test_bad_erp_raises_input_error(bad):
    with pytest.raises(InputError, match="ERP"):
        render_tiles(bad, plan_tiles(0.0), 8)


def test_half_precision_input_keeps_dtype():
    erp = textured_erp().float() / 255.0
    out = render_views(erp.to(torch.bfloat16), plan_tiles(0.0), 16)
    assert out.dtype == torch.bfloat16
    assert (out.float() - render_views(erp, plan_tiles(0.0), 16)).abs().max() < 1e-2


def test_grid_is_cached_per_geometry():
    from panobench.geometry.render import _tile_grid

    plan = plan_tiles(0.5)
    first = _tile_grid(plan, 16, 96, 192, torch.device("cpu"))
    assert _tile_grid(plan_tiles(0.5), 16, 96, 192, torch.device("cpu")) is first
    assert _tile_grid(plan, 16, 48, 96, torch.device("cpu")) is not first
