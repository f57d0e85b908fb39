"""Perceiver resampler (Flamingo): learned latents cross-attend to the vision tokens concatenated with themselves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from panobench.errors import ConfigError
from panobench.models.resamplers.base import check_input, config_to_dict, require_positive

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerceiverConfig:
    in_dim: int  # vision width; the latents live at this width too
    out_dim: int | None = None  # output width; None/0 -> in_dim (then no output projection)
    num_latents: int = 64  # learned latents = output tokens per view
    depth: int = 2  # number of PerceiverLayer blocks
    num_heads: int = 8  # attention heads; must divide in_dim
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio · in_dim

    def __post_init__(self) -> None:
        if not self.out_dim:
            object.__setattr__(self, "out_dim", self.in_dim)
        require_positive("perceiver", in_dim=self.in_dim, out_dim=self.out_dim, num_latents=self.num_latents,
                         depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
        if self.in_dim % self.num_heads:
            raise ConfigError(
                f"resampler 'perceiver': in_dim={self.in_dim} is not divisible by num_heads={self.num_heads}"
            )

    @classmethod
    def params_for_budget(cls, tokens_per_view: int, input_grid: int) -> dict[str, Any]:
        """The parameters that make this resampler hand the LM ``tokens_per_view`` tokens per view."""
        return {"num_latents": tokens_per_view}


class PerceiverAttention(nn.Module):
    """Latents ``(n, q, d)`` attend to ``concat(vision tokens, latents)`` ``(n, s + q, d)``.

    Flamingo's choice, made on purpose: letting the latents also attend to themselves gives them a way to
    keep (and exchange) what they already hold, instead of being overwritten by the media at every layer;
    it replaces the separate latent self-attention of a Q-Former at no extra module cost.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.layer_norm_media = nn.LayerNorm(dim)
        self.layer_norm_latents = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, latents: torch.Tensor, vision_tokens: torch.Tensor) -> torch.Tensor:
        n, q_len, d = latents.shape
        latents = self.layer_norm_latents(latents)
        context = torch.cat([self.layer_norm_media(vision_tokens), latents], dim=1)  # (n, s + q, d)
        m = context.shape[1]
        q = self.q_proj(latents).view(n, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(n, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(n, m, self.num_heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v)  # (n, heads, q, head_dim)
        return self.out_proj(attn.transpose(1, 2).reshape(n, q_len, d))


class PerceiverMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.layer_norm(hidden_states))))


class PerceiverLayer(nn.Module):
    """Pre-norm block: cross-attention (keys/values = vision tokens ++ latents), then MLP; each residual."""

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.cross_attn = PerceiverAttention(config.in_dim, config.num_heads)
        self.mlp = PerceiverMLP(config.in_dim, int(round(config.mlp_ratio * config.in_dim)))

    def forward(self, latents: torch.Tensor, vision_tokens: torch.Tensor) -> torch.Tensor:
        latents = latents + self.cross_attn(latents, vision_tokens)
        return latents + self.mlp(latents)


class PerceiverResampler(nn.Module):
    """Learned latents summarise the vision tokens: ``(n, s, in_dim) -> (n, num_latents, out_dim)``."""

    kernel_path = "torch"
    pool_factor = 1  # latents attend to every token; nothing is pooled

    def __init__(self, config: PerceiverConfig) -> None:
        super().__init__()
        self.config = config
        self.out_dim: int = int(config.out_dim)  # type: ignore[arg-type]
        self.latents = nn.Parameter(0.02 * torch.randn(config.num_latents, config.in_dim))
        self.layers = nn.ModuleList(PerceiverLayer(config) for _ in range(config.depth))
        self.layer_norm = nn.LayerNorm(config.in_dim)
        self.out_proj = nn.Linear(config.in_dim, self.out_dim) if self.out_dim != config.in_dim else nn.Identity()

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.config.num_latents

    def output_grid(self, input_grid: int) -> None:
        return None  # latents have no place on the patch grid

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(n, s, in_dim)`` to ``(n, num_latents, out_dim)``."""
        check_input(vision_tokens, self.config.in_dim, "perceiver")
        latents = self.latents.unsqueeze(0).expand(vision_tokens.shape[0], -1, -1)  # (n, q, d)
        for layer in self.layers:
            latents = layer(latents, vision_tokens)
        return self.out_proj(self.layer_norm(latents))
