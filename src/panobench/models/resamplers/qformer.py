"""Q-Former resampler: learned queries that self-attend and cross-attend to the vision tokens (BLIP-2 style)."""

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
class QFormerConfig:
    in_dim: int  # vision width; the queries live at this width too
    out_dim: int | None = None  # output width; None/0 -> in_dim (then no output projection)
    num_queries: int = 32  # learned queries = output tokens per view
    depth: int = 2  # number of QFormerLayer blocks
    num_heads: int = 8  # attention heads; must divide in_dim
    mlp_ratio: float = 4.0  # MLP hidden width = mlp_ratio · in_dim

    def __post_init__(self) -> None:
        if not self.out_dim:
            object.__setattr__(self, "out_dim", self.in_dim)
        require_positive("qformer", in_dim=self.in_dim, out_dim=self.out_dim, num_queries=self.num_queries,
                         depth=self.depth, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio)
        if self.in_dim % self.num_heads:
            raise ConfigError(f"resampler 'qformer': in_dim={self.in_dim} is not divisible by num_heads={self.num_heads}")

    @classmethod
    def params_for_budget(cls, tokens_per_view: int, input_grid: int) -> dict[str, Any]:
        """The parameters that make this resampler hand the LM ``tokens_per_view`` tokens per view."""
        return {"num_queries": tokens_per_view}


class QFormerAttention(nn.Module):
    """Multi-head attention with explicit projections: queries ``(n, q, d)`` attend to ``(n, m, d)``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n, q_len, d = hidden_states.shape
        m = context.shape[1]
        # (n, len, d) -> (n, heads, len, head_dim), the layout SDPA expects
        q = self.q_proj(hidden_states).view(n, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(n, m, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(n, m, self.num_heads, self.head_dim).transpose(1, 2)
        attn = F.scaled_dot_product_attention(q, k, v)  # (n, heads, q, head_dim)
        return self.out_proj(attn.transpose(1, 2).reshape(n, q_len, d))


class QFormerMLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class QFormerLayer(nn.Module):
    """Pre-norm block: self-attention over queries, cross-attention to vision tokens, MLP; each residual."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        dim = config.in_dim
        self.layer_norm1 = nn.LayerNorm(dim)
        self.self_attn = QFormerAttention(dim, config.num_heads)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.cross_attn = QFormerAttention(dim, config.num_heads)
        self.layer_norm3 = nn.LayerNorm(dim)
        self.mlp = QFormerMLP(dim, int(round(config.mlp_ratio * dim)))

    def forward(self, queries: torch.Tensor, vision_tokens: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm1(queries)
        queries = queries + self.self_attn(h, h)
        queries = queries + self.cross_attn(self.layer_norm2(queries), vision_tokens)
        return queries + self.mlp(self.layer_norm3(queries))


class QFormerResampler(nn.Module):
    """Learned queries read the vision tokens: ``(n, s, in_dim) -> (n, num_queries, out_dim)``."""

    kernel_path = "torch"
    pool_factor = 1  # queries attend to every token; nothing is pooled

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.out_dim: int = int(config.out_dim)  # type: ignore[arg-type]
        self.query_tokens = nn.Parameter(0.02 * torch.randn(config.num_queries, config.in_dim))
        # The vision encoder's output scale is not ours to assume; normalise keys/values once for all layers.
        self.vision_layer_norm = nn.LayerNorm(config.in_dim)
        self.layers = nn.ModuleList(QFormerLayer(config) for _ in range(config.depth))
        self.post_layernorm = nn.LayerNorm(config.in_dim)
        self.out_proj = nn.Linear(config.in_dim, self.out_dim) if self.out_dim != config.in_dim else nn.Identity()

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.config.num_queries

    def output_grid(self, input_grid: int) -> None:
        return None  # queries have no place on the patch grid

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(n, s, in_dim)`` to ``(n, num_queries, out_dim)``."""
        check_input(vision_tokens, self.config.in_dim, "qformer")
        context = self.vision_layer_norm(vision_tokens)
        queries = self.query_tokens.unsqueeze(0).expand(vision_tokens.shape[0], -1, -1)  # (n, q, d)
        for layer in self.layers:
            queries = layer(queries, context)
        return self.out_proj(self.post_layernorm(queries))
