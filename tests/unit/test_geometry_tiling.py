"""Tile plan: counts, effective overlap, ordering, validation."""

import pytest

from panobench.errors import ConfigError
from panobench.geometry.tiling import plan_tiles

# Seed table (SPEC §3): tiles per row at FOV 90°.
EXPECTED_TILES = {0.0: 4, 0.1: 5, 0.2: 5, 0.25: 6, 0.3: 6, 0.4: 7, 0.5: 8}


@pytest.mark.parametrize(("overlap", "tiles"), sorted(EXPECTED_TILES.items()))
def test_tile_counts_at_fov_90(overlap, tiles):
    plan = plan_tiles(overlap, fov_deg=90.0)
    assert plan.num_tiles == tiles
    assert plan.num_views() == tiles + 1
    assert plan.num_views(include_global=False) == tiles


@pytest.mark.parametrize("overlap", sorted(EXPECTED_TILES))
def test_yaw_centres_close_the_loop_and_overlap_is_reported(overlap):
    plan = plan_tiles(overlap)
    n = plan.num_tiles
    assert plan.yaw_step_deg == pytest.approx(360.0 / n)
    assert [t.yaw_deg for t in plan.tiles] == pytest.approx([k * 360.0 / n for k in range(n)])
    assert plan.nominal_overlap == overlap
    assert plan.effective_overlap == pytest.approx(1.0 - (360.0 / n) / 90.0)
    assert plan.effective_overlap >= overlap - 1e-12


def test_effective_overlap_values():
    assert plan_tiles(0.1).effective_overlap == pytest.approx(0.2)
    assert plan_tiles(0.25).effective_overlap == pytest.approx(1 / 3)
    assert plan_tiles(0.4).effective_overlap == pytest.approx(1 - (360 / 7) / 90)


def test_float_error_does_not_add_a_tile():
    # 60° * (1 - 0.4) = 36.000000000000004 in floats -> exactly 10 tiles, not 11.
    assert plan_tiles(0.4, fov_deg=60.0).num_tiles == 10
    assert plan_tiles(0.7, fov_deg=120.0).num_tiles == 10


def test_pitch_rows_are_row_major():
    plan = plan_tiles(0.5, pitch_rows=(-30.0, 30.0))
    assert plan.num_tiles == 16
    assert plan.tiles_per_row == 8
    assert [t.index for t in plan.tiles] == list(range(16))
    assert [t.pitch_deg for t in plan.tiles] == [-30.0] * 8 + [30.0] * 8
    assert [t.yaw_deg for t in plan.tiles[8:]] == [t.yaw_deg for t in plan.tiles[:8]]
    assert all(t.fov_deg == 90.0 for t in plan.tiles)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overlap": 1.0}, "overlap must be in"),
        ({"overlap": -0.1}, "overlap must be in"),
        ({"overlap": float("nan")}, "overlap must be finite"),
        ({"overlap": "0.5"}, "overlap must be a number"),
        ({"overlap": 0.5, "fov_deg": 0.0}, "fov_deg must be in"),
        ({"overlap": 0.5, "fov_deg": 180.0}, "fov_deg must be in"),
        ({"overlap": 0.5, "pitch_rows": (95.0,)}, "pitch_rows entries must be in"),
        ({"overlap": 0.5, "pitch_rows": ()}, "at least one pitch"),
        ({"overlap": 0.5, "pitch_rows": (0.0, 0.0)}, "must not repeat"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        plan_tiles(**kwargs)


def test_plan_is_hashable_and_equal_for_equal_inputs():
    assert plan_tiles(0.5) == plan_tiles(0.5)
    assert hash(plan_tiles(0.5)) == hash(plan_tiles(0.5))
