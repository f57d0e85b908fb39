"""Panorama positional encoding and token stitching, both derived from the tiler's token rays.

Every geometric quantity here comes from :class:`panobench.geometry.rays.ViewGeometry` for the *actual* tile plan
of the run (defect 1 of the original code: PE and stitching were hard-wired to overlap 0.5).

- PE: fixed features of each token's ray — sin/cos(k·yaw) for k = 1..K (periodic, so continuous across the 360°
  seam), sin/cos(k·pitch), and a global-view flag — mapped to the LM width by a learned linear layer. Rays that
  coincide in overlapping tiles get identical features, hence identical PE.
- Stitching: tokens of all views are laid out in plan order (tiles in yaw order, then the global view).
  ``concat`` keeps every token; ``dedupe`` keeps a tile token only if its tile is the one whose optical axis is
  nearest to its ray, so each direction is fed once.
- Query-based resamplers (qformer, perceiver) output tokens with no patch grid: each output token gets the ray of
  its view's optical axis (the global view: the forward direction, flagged global), and ``dedupe`` keeps all of
  them, since nothing identifies which queries duplicate a neighbour's content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from panobench.config import PEConfig
from panobench.geometry.rays import ViewGeometry, dedupe_keep_mask, pool_geometry


@dataclass(frozen=True)
class TokenLayout:
    """Geometry of the vision tokens handed to the LM, after resampling and stitching.

    Attributes:
        yaw: [V, N'] radians of each resampled token (N' = tokens per view after the resampler).
        pitch: [V, N'] radians.
        is_global: [V] bool.
        keep: [V, N'] bool, tokens that survive stitching.
        num_views: V.
        tokens_per_view: N'.
    """

    yaw: torch.Tensor
    pitch: torch.Tensor
    is_global: torch.Tensor
    keep: torch.Tensor

    @property
    def num_views(self) -> int:
        return int(self.yaw.shape[0])

    @property
    def tokens_per_view(self) -> int:
        return int(self.yaw.shape[1])


def token_layout(geom: ViewGeometry, output_grid: int | None, pool_factor: int, tokens_per_view: int,
                 stitching: str) -> TokenLayout:
    """Geometry of resampler outputs for every view, and which of them stitching keeps."""
    if output_grid is not None:
        g = pool_geometry(geom, pool_factor) if pool_factor > 1 else geom
        if g.rays.shape[1] != tokens_per_view:
            raise ValueError(f"resampler output grid {output_grid}² != pooled geometry tokens {g.rays.shape[1]}")
        keep = dedupe_keep_mask(g) if stitching == "dedupe" else torch.ones(g.yaw.shape, dtype=torch.bool)
        return TokenLayout(g.yaw.float(), g.pitch.float(), g.is_global.clone(), keep)
    # Query-based: one ray per view (its optical axis), repeated for every output token.
    views = geom.rays.shape[0]
    axis_yaw = torch.zeros(views)
    axis_pitch = torch.zeros(views)
    for i, tile in enumerate(geom.plan.tiles):
        axis_yaw[i] = math.radians(tile.yaw_deg)
        axis_pitch[i] = math.radians(tile.pitch_deg)
    yaw = axis_yaw[:, None].expand(views, tokens_per_view).clone()
    pitch = axis_pitch[:, None].expand(views, tokens_per_view).clone()
    keep = torch.ones(views, tokens_per_view, dtype=torch.bool)
    return TokenLayout(yaw, pitch, geom.is_global.clone(), keep)


def pe_features(layout: TokenLayout, config: PEConfig) -> torch.Tensor:
    """Fixed PE features, [V, N', F] with F = 2·K_yaw + 2·K_pitch + 1."""
    ks_yaw = torch.arange(1, config.yaw_frequencies + 1, dtype=torch.float32)
    ks_pitch = torch.arange(1, config.pitch_frequencies + 1, dtype=torch.float32)
    yaw = layout.yaw[..., None] * ks_yaw          # integer k keeps sin/cos(k·yaw) periodic in 2π
    pitch = layout.pitch[..., None] * ks_pitch
    flag = layout.is_global[:, None, None].float().expand(*layout.yaw.shape, 1)
    return torch.cat([yaw.sin(), yaw.cos(), pitch.sin(), pitch.cos(), flag], dim=-1)


class PanoramaPE(nn.Module):
    """Learned linear map of fixed ray features: [V, N', F] -> [V, N', dim] (a buffer of features per run)."""

    def __init__(self, layout: TokenLayout, config: PEConfig, dim: int) -> None:
        super().__init__()
        features = pe_features(layout, config)
        self.register_buffer("features", features, persistent=False)
        self.proj = nn.Linear(features.shape[-1], dim)
        # Start small so an untrained PE does not swamp the vision features.
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self) -> torch.Tensor:
        return self.proj(self.features)
