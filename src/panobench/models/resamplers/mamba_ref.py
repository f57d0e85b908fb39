"""Pure-PyTorch Mamba (S6) layer with the parameter names, shapes and init of ``mamba_ssm.Mamba``.

Checkpoints therefore move between this reference path and the fused mamba-ssm CUDA kernels unchanged:
``bimamba.py`` feeds these very parameters to mamba-ssm's functional kernels when they are available.

The selective scan is a chunked parallel scan: inside a chunk of T steps every output is a decay-weighted
sum over earlier steps, computed at once from differences of cumulative log-decays; only the state carried
from chunk to chunk is sequential, so the Python loop runs L/T times, not L times.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)


def _scan_chunk(
    h0: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan over one chunk, all float32.

    Recurrence: ``h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t``, ``y_t = C_t · h_t``. With the cumulative
    log-decay ``S_t = Σ_{r≤t} Δ_r A`` (≤ 0, decreasing), ``h_t = exp(S_t) h_0 + Σ_{s≤t} exp(S_t − S_s) Δ_s B_s u_s``.
    Only ``S_t − S_s`` for s ≤ t is ever exponentiated, which is ≤ 0: no overflow, however large Δ grows.

    Args:
        h0: ``(b, d, n)`` state carried in from the previous chunk.
        u, delta: ``(b, d, t)`` scan input and (softplus-ed) step sizes.
        A: ``(d, n)`` negative state matrix diagonal.
        B, C: ``(b, n, t)`` input-dependent projections.

    Returns:
        y ``(b, d, t)`` and the last state ``(b, d, n)``.
    """
    t = u.shape[-1]
    cum = torch.cumsum(delta.unsqueeze(-1) * A.unsqueeze(1), dim=2)  # S: (b, d, t, n)
    diff = cum.unsqueeze(3) - cum.unsqueeze(2)  # S_t − S_s: (b, d, t, s, n)
    causal = torch.ones(t, t, dtype=torch.bool, device=u.device).tril()  # s ≤ t
    # Mask *before* exp: the upper triangle holds large positive numbers; exp(-inf) = 0 with zero gradient.
    decay = diff.masked_fill(~causal.unsqueeze(-1), float("-inf")).exp()
    x = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)  # Δ_s B_s u_s: (b, d, s, n)
    h = torch.einsum("bdtsn,bdsn->bdtn", decay, x) + cum.exp() * h0.unsqueeze(2)  # (b, d, t, n)
    y = torch.einsum("bdtn,btn->bdt", h, C.transpose(1, 2))
    return y, h[:, :, -1]


def _scan_stepwise(
    h: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """``chunk_size == 1``: the recurrence one step at a time, decays and inputs precomputed for all steps at once.

    For short sequences (the embedded default's 16 tokens per view) this is the cheapest path: two element-wise ops
    per step, and nothing to recompute (a (b, d, 1, 1, n) chunk tensor is not worth checkpointing).
    """
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))                  # exp(Δ_t A): (b, d, l, n)
    x = (delta * u).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1)         # Δ_t B_t u_t: (b, d, l, n)
    states = []
    for t in range(u.shape[-1]):
        h = decay[:, :, t] * h + x[:, :, t]
        states.append(h)
    return torch.einsum("bdln,bln->bdl", torch.stack(states, dim=2), C.transpose(1, 2))


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    chunk_size: int = 16,
) -> torch.Tensor:
    """Chunked selective scan with the argument layout of ``mamba_ssm``'s ``selective_scan_fn``.

    Args:
        u: ``(b, d, l)`` input. delta: ``(b, d, l)`` step sizes before bias/softplus.
        A: ``(d, n)``. B, C: ``(b, n, l)``. D: ``(d,)`` skip. z: ``(b, d, l)`` gate (``y · silu(z)``).
        delta_bias: ``(d,)`` added to delta before softplus.
        chunk_size: T; peak memory per chunk is ``b·d·T²·n`` floats.

    Returns:
        ``(b, d, l)`` in the dtype of ``u``; the scan itself runs in float32.
    """
    # Under bf16 autocast the einsums would silently drop to bf16; the recurrence needs float32.
    with torch.autocast(device_type=u.device.type, enabled=False):
        return _selective_scan_fp32(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk_size)


def _selective_scan_fp32(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk_size: int,
) -> torch.Tensor:
    dtype_in = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float().unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    b, d, length = u.shape
    h = u.new_zeros(b, d, A.shape[1])
    if chunk_size == 1:
        y = _scan_stepwise(h, u, delta, A, B, C)
    else:
        # Recompute each chunk's (b, d, T, T, n) decay tensor in backward instead of keeping L/T of them alive.
        use_checkpoint = torch.is_grad_enabled() and any(x.requires_grad for x in (u, delta, A, B, C))
        ys = []
        for start in range(0, length, chunk_size):
            part = slice(start, start + chunk_size)
            args = (h, u[..., part], delta[..., part], A, B[..., part], C[..., part])
            if use_checkpoint:
                y, h = checkpoint(_scan_chunk, *args, use_reentrant=False)
            else:
                y, h = _scan_chunk(*args)
            ys.append(y)
        y = torch.cat(ys, dim=-1)
    if D is not None:
        y = y + u * D.float().unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


class MambaReference(nn.Module):
    """Mamba (S6) mixer in plain PyTorch: ``(b, l, d_model) -> (b, l, d_model)``.

    Parameters (names/shapes identical to ``mamba_ssm.Mamba`` with default ``bias=False, conv_bias=True``):
    ``in_proj.weight [2·d_inner, d_model]``, ``conv1d.weight [d_inner, 1, d_conv]``, ``conv1d.bias [d_inner]``,
    ``x_proj.weight [dt_rank + 2·d_state, d_inner]``, ``dt_proj.weight [d_inner, dt_rank]``,
    ``dt_proj.bias [d_inner]``, ``A_log [d_inner, d_state]``, ``D [d_inner]``, ``out_proj.weight [d_model, d_inner]``.
    """

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 16,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.chunk_size = chunk_size

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        # Depthwise causal conv: pad d_conv-1 on both sides and keep the first l outputs.
        self.conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1, bias=True
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self._init_dt_proj(dt_min, dt_max, dt_init_floor)
        # S4D-real init: A = -(1..d_state) for every channel, stored as its log (kept in float32).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.D = nn.Parameter(torch.ones(self.d_inner))  # skip connection, starts as identity
        # Optimizer hints honoured by mamba-ssm users' param-group code; kept so both paths behave alike.
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        # Created last, as in mamba_ssm, so one seed draws the very same initial weights on both paths.
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @torch.no_grad()
    def _init_dt_proj(self, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        """dt init of ``mamba_ssm.Mamba`` (dt_init="random", dt_scale=1): same distributions and draw order."""
        dt_std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_std, dt_std)
        # Bias so that softplus(bias) is log-uniform in [dt_min, dt_max]: the inverse softplus dt + log(1 - e^-dt).
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

    def ssm_inputs(self, hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything between ``in_proj`` and the scan, in the ``(b, channels, l)`` layout the scans take."""
        length = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (b, 2·d_inner, l)
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :length])  # causal: drop the right padding
        x_dbl = self.x_proj(x.transpose(1, 2))  # (b, l, dt_rank + 2·d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (b, d_inner, l); bias goes in the scan
        return {
            "u": x,
            "delta": dt,
            "A": -torch.exp(self.A_log.float()),
            "B": B.transpose(1, 2),
            "C": C.transpose(1, 2),
            "D": self.D.float(),
            "z": z,
            "delta_bias": self.dt_proj.bias.float(),
        }

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(b, l, d_model) -> (b, l, d_model)`` through the chunked reference scan."""
        y = selective_scan_reference(
            **self.ssm_inputs(hidden_states), delta_softplus=True, chunk_size=self.chunk_size
        )  # (b, d_inner, l)
        return self.out_proj(y.transpose(1, 2))
