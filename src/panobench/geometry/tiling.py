"""anyres-e2p tile plan: where each perspective tile looks, derived from overlap, FOV and pitch rows.

The plan is the single source of truth for tile geometry: the renderer, token rays (PE, stitching,
stage-1 correspondences) and the contact sheet all read yaw/pitch/FOV from it, never from the nominal
overlap (SPEC §2 item 1).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from panobench.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tile:
    """One perspective tile: a square pinhole camera at the panorama's centre.

    Attributes:
        index: Position in the plan (= view index; tiles come before the global view).
        yaw_deg: Azimuth of the optical axis in degrees, positive to the right (py360convert ``u``).
        pitch_deg: Elevation of the optical axis in degrees, positive up (py360convert ``v``).
        fov_deg: Horizontal = vertical field of view in degrees.
    """

    index: int
    yaw_deg: float
    pitch_deg: float
    fov_deg: float


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one anyres-e2p configuration, row-major (pitch row, then yaw ascending).

    Attributes:
        fov_deg: Field of view of every tile in degrees.
        nominal_overlap: The overlap asked for (fraction of the FOV shared by yaw neighbours).
        effective_overlap: The overlap actually realised after closing the 360° loop, ``1 - step/fov``.
        yaw_step_deg: Spacing of yaw centres in degrees (``360 / tiles per row``).
        pitch_rows: Pitch of each row of tiles in degrees, in plan order.
        tiles: Every tile, in plan order.
    """

    fov_deg: float
    nominal_overlap: float
    effective_overlap: float
    yaw_step_deg: float
    pitch_rows: tuple[float, ...]
    tiles: tuple[Tile, ...]

    @property
    def num_tiles(self) -> int:
        return len(self.tiles)

    @property
    def tiles_per_row(self) -> int:
        return len(self.tiles) // len(self.pitch_rows)

    def num_views(self, include_global: bool = True) -> int:
        """Number of images the vision encoder sees: the tiles plus, optionally, the one global view."""
        return self.num_tiles + int(include_global)


def plan_tiles(overlap: float, fov_deg: float = 90.0, pitch_rows: Sequence[float] = (0.0,)) -> TilePlan:
    """Place tiles around the sphere so that yaw neighbours overlap by at least ``overlap``.

    Yaw centres close the loop: ``N = ceil(360 / (fov * (1 - overlap)))`` tiles per row at ``k * 360/N``,
    so the realised (effective) overlap is ``1 - (360/N)/fov`` >= the nominal one.

    Args:
        overlap: Nominal overlap fraction in [0, 1).
        fov_deg: Tile field of view in degrees, in (0, 180).
        pitch_rows: Pitch of each row in degrees, each in [-90, 90]; every row gets the same yaw centres.

    Returns:
        The tile plan.

    Raises:
        ConfigError: If a parameter is out of range.
    """
    overlap, fov_deg = _as_float("overlap", overlap), _as_float("fov_deg", fov_deg)
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"tile overlap must be in [0, 1), got {overlap!r}")
    if not 0.0 < fov_deg < 180.0:
        raise ConfigError(f"tile fov_deg must be in (0, 180) degrees, got {fov_deg!r}")
    rows = tuple(_as_float("pitch_rows", p) for p in pitch_rows)
    if not rows:
        raise ConfigError("tile pitch_rows must name at least one pitch, got an empty list")
    for pitch in rows:
        if not -90.0 <= pitch <= 90.0:
            raise ConfigError(f"tile pitch_rows entries must be in [-90, 90] degrees, got {pitch!r}")
    if len(set(rows)) != len(rows):
        raise ConfigError(f"tile pitch_rows must not repeat a pitch, got {list(rows)}")

    step_raw = fov_deg * (1.0 - overlap)
    # Rounding first keeps e.g. 360/72.0000000001 from tipping ceil() over to one tile too many.
    n_yaw = max(1, math.ceil(round(360.0 / step_raw, 9)))
    step = 360.0 / n_yaw
    tiles = tuple(
        Tile(index=r * n_yaw + k, yaw_deg=k * step, pitch_deg=pitch, fov_deg=fov_deg)
        for r, pitch in enumerate(rows)
        for k in range(n_yaw)
    )
    plan = TilePlan(fov_deg=fov_deg, nominal_overlap=overlap, effective_overlap=1.0 - step / fov_deg,
                    yaw_step_deg=step, pitch_rows=rows, tiles=tiles)
    logger.debug("tile plan: fov %.1f overlap %.3f -> %d tiles/row (effective overlap %.3f)",
                 fov_deg, overlap, n_yaw, plan.effective_overlap)
    return plan


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"tile {name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"tile {name} must be finite, got {value!r}")
    return float(value)
