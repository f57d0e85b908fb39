"""Bidirectional Mamba resampler: pooled grid tokens through forward and reverse selective scans (Vim-style).

Kernel paths. The mixers are always ``MambaReference`` modules, so the parameters (names, shapes, init)
are those of ``mamba_ssm.Mamba`` whatever runs. On CUDA with mamba-ssm importable the very same
parameters are handed to mamba-ssm's functional kernels (``mamba_inner_fn``, or ``selective_scan_fn`` when
causal-conv1d is missing), exactly as ``mamba_ssm.Mamba.forward`` does; everywhere else the pure-PyTorch
chunked scan runs. A checkpoint's state dict is therefore identical on both paths by construction.

The path is fixed the first time it is resolved (a ``device`` hint at construction, ``resolve_kernel_path``,
or the first forward), recorded in ``kernel_path``, and a later call that would pick the other path raises
instead of switching silently mid-run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from panobench.errors import ConfigError
from panobench.models.resamplers.base import (
    check_input,
    config_to_dict,
    grid_side,
    pool_factor_for_budget,
    pool_grid_tokens,
    pooled_grid_side,
    require_positive,
)
from panobench.models.resamplers.mamba_ref import MambaReference

logger = logging.getLogger(__name__)

MAMBA_SSM_MISSING = (
    "resampler 'bimamba' on a CUDA device: mamba-ssm is not installed ({reason}); the reference scan is ~1000× "
    "slower on GPU; pip install mamba-ssm --no-build-isolation, or set resampler.params.allow_reference_on_cuda: true "
    "(workflow config: resampler_params.bimamba.allow_reference_on_cuda)"
)
REFERENCE_FORBIDDEN = (
    "resampler 'bimamba': resampler.params.use_mamba_ssm: never on a CUDA device runs the pure-PyTorch reference scan, ~1000× "
    "slower than mamba-ssm; set resampler.params.allow_reference_on_cuda: true to do this on purpose"
)


@dataclass(frozen=True)
class BiMambaConfig:
    in_dim: int  # vision width = Mamba d_model
    out_dim: int | None = None  # output width; None/0 -> in_dim (then no output projection)
    depth: int = 2  # number of BiMambaLayer blocks
    d_state: int = 16  # SSM state size per channel
    d_conv: int = 4  # causal depthwise conv width
    expand: int = 2  # d_inner = expand · in_dim
    pool_factor: int = 1  # k: average-pool the g×g grid k×k before the scans (1 = keep every token)
    use_mamba_ssm: Literal["auto", "never"] = "auto"  # auto: fused mamba-ssm kernels on CUDA when importable
    allow_reference_on_cuda: bool = False  # permit the (very slow) reference scan on a CUDA device
    scan_chunk_size: int = 16  # reference scan chunk T: Python loop runs L/T times; work and memory ∝ T

    def __post_init__(self) -> None:
        if not self.out_dim:
            object.__setattr__(self, "out_dim", self.in_dim)
        require_positive("bimamba", in_dim=self.in_dim, out_dim=self.out_dim, depth=self.depth,
                         d_state=self.d_state, d_conv=self.d_conv, expand=self.expand,
                         pool_factor=self.pool_factor, scan_chunk_size=self.scan_chunk_size)

    @classmethod
    def params_for_budget(cls, tokens_per_view: int, input_grid: int) -> dict[str, Any]:
        """The parameters that make this resampler hand the LM ``tokens_per_view`` tokens per view."""
        return {"pool_factor": pool_factor_for_budget("bimamba", tokens_per_view, input_grid)}


class _MambaKernels(NamedTuple):
    mamba_inner_fn: Any  # fused conv + scan + out_proj; needs causal-conv1d
    selective_scan_fn: Any  # scan only
    has_causal_conv1d: bool


def _mamba_kernels() -> _MambaKernels:
    """Import mamba-ssm's functional kernels lazily (``import panobench`` must work without them)."""
    try:
        from mamba_ssm.ops import selective_scan_interface as ssi
    except ImportError as exc:  # also a broken build (undefined symbol in the .so) lands here
        raise ConfigError(MAMBA_SSM_MISSING.format(reason=f"{type(exc).__name__}: {exc}")) from exc
    has_conv = getattr(ssi, "causal_conv1d_fwd_function", None) is not None
    return _MambaKernels(ssi.mamba_inner_fn, ssi.selective_scan_fn, has_conv)


def _mamba_ssm_available() -> tuple[bool, str]:
    """(importable, reason if not)."""
    try:
        _mamba_kernels()
    except ConfigError as exc:
        return False, str(exc.__cause__)
    return True, ""


def select_kernel_path(device_type: str, use_mamba_ssm: str, allow_reference_on_cuda: bool) -> str:
    """Pick "mamba_ssm" or "reference" for a device type; refuse the reference on CUDA unless allowed.

    Raises:
        ConfigError: CUDA without mamba-ssm (or with use_mamba_ssm="never") and allow_reference_on_cuda false.
    """
    if device_type != "cuda":
        return "reference"  # mamba-ssm kernels are CUDA-only
    if use_mamba_ssm == "auto":
        available, reason = _mamba_ssm_available()
        if available:
            return "mamba_ssm"
        if not allow_reference_on_cuda:
            raise ConfigError(MAMBA_SSM_MISSING.format(reason=reason))
    elif not allow_reference_on_cuda:
        raise ConfigError(REFERENCE_FORBIDDEN)
    logger.warning("bimamba runs the pure-PyTorch reference scan on CUDA (allow_reference_on_cuda: true); slow")
    return "reference"


def fused_mamba_forward(mixer: MambaReference, hidden_states: torch.Tensor) -> torch.Tensor:
    """``(b, l, d_model) -> (b, l, d_model)`` with mamba-ssm's CUDA kernels on ``mixer``'s own parameters.

    Mirrors ``mamba_ssm.Mamba.forward`` (no inference cache): fused ``mamba_inner_fn`` when causal-conv1d is
    installed, otherwise torch conv + ``selective_scan_fn``.
    """
    kernels = _mamba_kernels()
    if not kernels.has_causal_conv1d:
        y = kernels.selective_scan_fn(**mixer.ssm_inputs(hidden_states), delta_softplus=True)  # (b, d_inner, l)
        return mixer.out_proj(y.transpose(1, 2))
    b, length, d_model = hidden_states.shape
    # One matmul gives (2·d_inner, b·l); viewed as (b, 2·d_inner, l) it has unit stride along l, the layout
    # the kernels want, without a transpose copy.
    xz = (mixer.in_proj.weight @ hidden_states.reshape(b * length, d_model).t()).view(-1, b, length).transpose(0, 1)
    return kernels.mamba_inner_fn(
        xz,
        mixer.conv1d.weight,
        mixer.conv1d.bias,
        mixer.x_proj.weight,
        mixer.dt_proj.weight,
        mixer.out_proj.weight,
        None,  # out_proj has no bias
        -torch.exp(mixer.A_log.float()),
        None,  # input-dependent B
        None,  # input-dependent C
        mixer.D.float(),
        delta_bias=mixer.dt_proj.bias.float(),
        delta_softplus=True,
    )


class BiMambaLayer(nn.Module):
    """Pre-norm residual block: ``x + ½·(fwd_mamba(norm x) + flip(bwd_mamba(flip(norm x))))``.

    The two directions have their own parameters and are *averaged*, not summed, so the residual branch has
    the scale of a single Mamba at init and depth can grow without re-tuning. Scans run over the row-major
    token order; the reverse scan gives every token a view of the tokens after it.
    """

    def __init__(self, config: BiMambaConfig) -> None:
        super().__init__()
        kwargs = {"d_state": config.d_state, "d_conv": config.d_conv, "expand": config.expand,
                  "chunk_size": config.scan_chunk_size}
        self.norm = nn.LayerNorm(config.in_dim)
        self.fwd_mamba = MambaReference(config.in_dim, **kwargs)
        self.bwd_mamba = MambaReference(config.in_dim, **kwargs)

    def forward(self, hidden_states: torch.Tensor, kernel_path: str) -> torch.Tensor:
        mix = fused_mamba_forward if kernel_path == "mamba_ssm" else (lambda mixer, h: mixer(h))
        h = self.norm(hidden_states)  # (n, s, d)
        forward_scan = mix(self.fwd_mamba, h)
        backward_scan = mix(self.bwd_mamba, h.flip(1)).flip(1)
        return hidden_states + 0.5 * (forward_scan + backward_scan)


class BiMambaResampler(nn.Module):
    """Bidirectional Mamba over (pooled) grid tokens: ``(n, g·g, in_dim) -> (n, (g/k)², out_dim)``."""

    def __init__(self, config: BiMambaConfig, device: torch.device | str | None = None) -> None:
        """Build the resampler; ``device`` (optional) fixes the kernel path now instead of at first forward."""
        super().__init__()
        self.config = config
        self.out_dim: int = int(config.out_dim)  # type: ignore[arg-type]
        self.pool_factor: int = config.pool_factor
        self.layers = nn.ModuleList(BiMambaLayer(config) for _ in range(config.depth))
        self.norm_f = nn.LayerNorm(config.in_dim)
        self.out_proj = nn.Linear(config.in_dim, self.out_dim) if self.out_dim != config.in_dim else nn.Identity()
        self._kernel_path: str | None = None
        self._kernel_device_type: str | None = None
        if device is not None:
            self.resolve_kernel_path(device)

    @property
    def kernel_path(self) -> str:
        """The path that ran (once resolved) or that will run on the device the parameters are on now."""
        if self._kernel_path is not None:
            return self._kernel_path
        device_type = self.norm_f.weight.device.type
        return select_kernel_path(device_type, self.config.use_mamba_ssm, self.config.allow_reference_on_cuda)

    def resolve_kernel_path(self, device: torch.device | str) -> str:
        """Fix the kernel path for ``device``; raise rather than switch if it was fixed to another path."""
        device_type = torch.device(device).type
        if device_type == self._kernel_device_type:
            return self._kernel_path  # type: ignore[return-value]
        path = select_kernel_path(device_type, self.config.use_mamba_ssm, self.config.allow_reference_on_cuda)
        if self._kernel_path is not None and path != self._kernel_path:
            raise ConfigError(
                f"resampler 'bimamba' ran with kernel path {self._kernel_path!r} and now got {device_type} "
                f"inputs that need {path!r}; switching kernels mid-run is refused: build a new resampler"
            )
        if self._kernel_path is None:
            logger.info("bimamba kernel path: %s (device %s)", path, device_type)
        self._kernel_path, self._kernel_device_type = path, device_type
        return path

    def num_output_tokens(self, num_input_tokens: int) -> int:
        return self.output_grid(grid_side(num_input_tokens)) ** 2

    def output_grid(self, input_grid: int) -> int:
        return pooled_grid_side(input_grid, self.pool_factor)

    def config_dict(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def forward(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Map ``(n, s, in_dim)`` row-major grid tokens to ``(n, s / k², out_dim)``."""
        check_input(vision_tokens, self.config.in_dim, "bimamba")
        path = self.resolve_kernel_path(vision_tokens.device)
        x = pool_grid_tokens(vision_tokens, self.pool_factor)  # (n, s/k², d)
        for layer in self.layers:
            x = layer(x, path)
        return self.out_proj(self.norm_f(x))
