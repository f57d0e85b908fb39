"""MLP resampler: optional k×k average pooling, then a pre-LayerNorm 2-layer GELU MLP per token."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from panobench.models.resamplers.base import (
    check_input,
    config_to_dict,
    grid_side,
    pool_factor_for_budget,
    pool_grid_tokens,
    pooled_grid_side,
    require_positive,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLPConfig:
    in_dim: int  # vision width (SigLIP hidden size)
    out_dim: int | None = None  # output width; None/0 -> in_dim (the projector to the LM width is separate)
    hidden_dim: int | None = None  # width between fc1 and fc2; None/0 -> out_dim
    pool_factor: int = 1  # k: average-pool the g×g grid k×k before the MLP (1 = keep every token)

    def __post_init__(self) -> None:
        # Resolve the "same as" defaults here so config_dict() and checkpoints hold concrete numbers.
        if not self.out_dim:
            object.__setattr__(self, "out_dim", self.in_dim)
        if not self.hidden_dim:
            object.__setattr__(self, "hidden_dim", self.out_dim)
        require_positive("mlp", in_dim=self.in_dim, out_dim=self.out_dim, hidden_dim=self.hidden_dim,
                         pool_factor=self.pool_factor)

    @classmethod
    def params_for_budget(cls, tokens_per_view: int, input_grid: int) -> dict[str, Any]:
        """The parameters that make this resampler hand the LM ``tokens_per_view`` tokens per view."""
        return {"pool_factor": pool_factor_for_budget("mlp", tokens_per_view, input_grid)}


class MLPResampler(nn.Module):
    """Token-wise MLP on (optionally pooled) grid tokens: ``(n, g·g, in_dim) -> (n, (g/k)², out_dim)``."""

    kernel_path = "torch"

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        self.out_dim: int = int(config.out_dim)  # type: ignore[arg-type]
        self.pool_factor: int = config.pool_factor
        self.layer_norm = nn.LayerNorm(config.in_dim)
        self.fc1 = nn.Linear(config.in_dim, int(config.hidden_dim))  # type: ignore[arg-type]
        self.act = nn.GELU()
        self.fc2 = nn.Linear(int(config.hidden_dim), self.out_dim)  # type: ignore[arg-type]

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.output_grid(grid_side(num_input_tokens)) ** 2

    def output_grid(self, input_grid: int) -> int:
        return pooled_grid_side(input_grid, self.pool_factor)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(n, s, in_dim)`` row-major grid tokens to ``(n, s / k², out_dim)``."""
        check_input(vision_tokens, self.config.in_dim, "mlp")
        x = pool_grid_tokens(vision_tokens, self.pool_factor)  # (n, s/k², in_dim)
        return self.fc2(self.act(self.fc1(self.layer_norm(x))))


__all__ = ["MLPConfig", "MLPResampler"]
