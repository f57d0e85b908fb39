"""What every resampler shares: the module contract, config construction and k×k grid pooling.

Axis letters used in shape comments across the resampler files:
    n = B·V (images × views), s = vision tokens per view (grid², row-major), d = channels,
    q = learned queries/latents, g = side of the patch grid, k = pool factor.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F

from panobench.config import checked_fields
from panobench.errors import ConfigError

logger = logging.getLogger(__name__)

C = TypeVar("C")


@runtime_checkable
class Resampler(Protocol):
    """Contract of every resampler: ``(n, s, in_dim) -> (n, num_output_tokens(s), out_dim)``.

    Attributes:
        out_dim: channel width of the output tokens (the projector to the LM width is separate).
        pool_factor: grid tokens are average-pooled k×k *before* anything else (1 = no pooling), so the
            integrator can pool the per-token rays identically.
        kernel_path: which implementation runs: "torch" for plain PyTorch modules; for bimamba
            "mamba_ssm" (fused CUDA kernels) or "reference" (pure-PyTorch chunked scan).
    """

    out_dim: int
    pool_factor: int

    @property
    def kernel_path(self) -> str: ...

    def num_output_tokens(self, num_input_tokens: int) -> int: ...

    def output_grid(self, input_grid: int) -> int | None: ...

    def config_dict(self) -> dict[str, Any]: ...

    def __call__(self, vision_tokens: torch.Tensor) -> torch.Tensor: ...


def config_from_params(config_cls: type[C], in_dim: int, params: dict[str, Any] | None, *, name: str) -> C:
    """Build a frozen resampler config from a plain dict, rejecting unknown keys and ill-typed values.

    The keys and types are checked by the run config's own checker (``config.checked_fields``), as the
    ``resampler.params`` section of a run config; ranges and cross-field rules are each config's ``__post_init__``.
    ``params`` may repeat ``in_dim`` (as ``config_dict()`` output does) only if it agrees with ``in_dim``.

    Raises:
        ConfigError: naming the resampler, the full key (``resampler.params.<key>``), the bad value and what was
            expected.
    """
    params = dict(params or {})
    if "in_dim" in params and params.pop("in_dim") != in_dim:
        raise ConfigError(f"resampler {name!r}: params in_dim does not match the vision width {in_dim}")
    try:
        fields = checked_fields(config_cls, {**params, "in_dim": in_dim}, "resampler.params")
    except ConfigError as err:
        raise ConfigError(f"resampler {name!r}: {err}") from None
    return config_cls(**fields)


def require_positive(name: str, **values: int | float) -> None:
    """Raise ConfigError naming the first non-positive hyper-parameter."""
    for key, value in values.items():
        if value <= 0:
            raise ConfigError(f"resampler {name!r}: parameter {key!r} must be > 0, got {value!r}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Resolved hyper-parameters of a frozen config as a plain, YAML/JSON-safe dict."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def grid_side(num_tokens: int) -> int:
    """Side g of a square patch grid holding ``num_tokens`` tokens; ConfigError if it is not square."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens or num_tokens <= 0:
        raise ConfigError(f"resampler input has {num_tokens} tokens per view, which is not a square patch grid")
    return side


def pooled_grid_side(input_grid: int, pool_factor: int) -> int:
    """Side of the grid after k×k average pooling; ConfigError if k does not divide the grid."""
    if input_grid % pool_factor:
        raise ConfigError(
            f"resampler pool_factor={pool_factor} does not divide the {input_grid}×{input_grid} patch grid"
        )
    return input_grid // pool_factor


def pool_grid_tokens(tokens: torch.Tensor, pool_factor: int) -> torch.Tensor:
    """Average-pool row-major grid tokens k×k.

    Args:
        tokens: ``(n, g·g, d)`` tokens of a row-major g×g patch grid.
        pool_factor: k; must divide g. 1 returns the input unchanged.

    Returns:
        ``(n, (g/k)·(g/k), d)``, still row-major.
    """
    if pool_factor == 1:
        return tokens
    n, s, d = tokens.shape
    g = grid_side(s)
    out_g = pooled_grid_side(g, pool_factor)
    grid = tokens.transpose(1, 2).reshape(n, d, g, g)  # (n, d, g, g)
    pooled = F.avg_pool2d(grid, kernel_size=pool_factor, stride=pool_factor)  # (n, d, g/k, g/k)
    return pooled.reshape(n, d, out_g * out_g).transpose(1, 2)


def pool_factor_for_budget(name: str, tokens_per_view: int, input_grid: int) -> int:
    """The k×k pool factor that turns a g×g grid into ``tokens_per_view`` tokens (grid-based resamplers).

    Raises:
        ConfigError: ``tokens_per_view`` is not (g/k)² for any k dividing g; the message lists the budgets that are.
    """
    side = math.isqrt(tokens_per_view)
    if side * side == tokens_per_view and side > 0 and input_grid % side == 0:
        return input_grid // side
    possible = sorted((input_grid // k) ** 2 for k in range(1, input_grid + 1) if input_grid % k == 0)
    raise ConfigError(f"resampler {name!r}: tokens_per_view={tokens_per_view} cannot be pooled from the "
                      f"{input_grid}×{input_grid} patch grid; choose one of {possible}")


def check_input(vision_tokens: torch.Tensor, in_dim: int, name: str) -> None:
    """Fail with expected vs actual shape (HF style) instead of an opaque matmul error."""
    if vision_tokens.dim() != 3 or vision_tokens.shape[-1] != in_dim:
        raise ValueError(
            f"{name} resampler expects vision tokens of shape (B·V, S, {in_dim}), got {tuple(vision_tokens.shape)}"
        )
