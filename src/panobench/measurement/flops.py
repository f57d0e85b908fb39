"""Model FLOPs of one step by the field's convention, and MFU against the device's datasheet peak.

Convention (SPEC §5; PaLM's "model FLOPs", with causal attention counted once, as FlashAttention's benchmarks do):

- matrix products (``mm``/``addmm``/``bmm``/convolutions) are counted from their shapes by torch's own formulas
  (``torch.utils.flop_counter``), over one real forward + backward step, so frozen weights cost no weight gradient
  and a frozen tower run under ``no_grad`` costs its forward only;
- attention counts the **attended (query, key) pairs** only: all pairs without a mask, the lower triangle for
  ``is_causal``, the allowed entries of a boolean or additive mask (padding included). Per pair and query head the
  forward is ``2·d_qk + 2·d_v`` (QKᵀ and PV) and the backward twice that (dP, dV, dQ, dK); the scores that fused
  backward kernels recompute are not model FLOPs. Grouped-query attention (fewer K/V heads) counts per query head;
- gradient-checkpoint recomputation is not counted: while counting, each checkpointed layer (transformers'
  ``_gradient_checkpointing_func`` convention) recomputes inside a marker context that the counter skips, so a step
  counts the same with and without checkpointing. (Counting runs eagerly, before any block is compiled: under
  ``torch.compile`` a checkpoint's ``context_fn`` may only yield dispatch modes, so the marker is swapped in for the
  count only.)

torch's own SDPA formulas count every (query, key) pair whether masked or not, count the backward's recompute, and
(torch 2.11) assert on grouped-query shapes; ours replace them for every fused SDPA kernel, CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch.utils._python_dispatch import TorchDispatchMode

logger = logging.getLogger(__name__)

# Dense (no sparsity) bf16 tensor-core peak by device name, from NVIDIA's datasheets, whose headline figures are
# with 2:4 sparsity (H100/H200 SXM 1979, H100 PCIe 1513 TFLOP/s): halved here. First match wins; a device that
# matches no row has no peak and its MFU is null, never estimated. NVL parts run other clocks: deliberately absent.
DATASHEET_BF16_DENSE_PEAK: tuple[tuple[str, str, float | None], ...] = (
    (r"\bH1[02]0\b.*\bNVL\b", "H100/H200 NVL (not tabulated)", None),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756e12),
    (r"\bH100\b", "H100 SXM", 989e12),
    (r"\bH200\b", "H200", 989e12),
    (r"\bA100\b", "A100", 312e12),
)


def datasheet_peak_flops(device_name: str | None) -> tuple[float | None, str | None]:
    """(dense bf16 FLOP/s, datasheet part) for a device name such as ``torch.cuda.get_device_name()``.

    ``(None, None)`` for a name no row matches (a CPU, an unlisted GPU): the MFU denominator is then unknown.
    """
    if not device_name:
        return None, None
    for pattern, part, peak in DATASHEET_BF16_DENSE_PEAK:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peak, (part if peak is not None else None)
    return None, None


def mfu(flops_per_step: float | None, step_time_s: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation; None when any input is missing or not positive (never a division by None)."""
    if not flops_per_step or not step_time_s or not peak_flops or step_time_s <= 0 or peak_flops <= 0:
        return None
    return float(flops_per_step) / float(step_time_s) / float(peak_flops)


# ------------------------------------------------------------------------------------------------ recompute marker


class _RecomputeDepth:
    """How many gradient-checkpoint recomputations are running (in the autograd thread that runs them)."""

    value = 0


@contextlib.contextmanager
def _recomputing() -> Iterator[None]:
    _RecomputeDepth.value += 1
    try:
        yield
    finally:
        _RecomputeDepth.value -= 1


def _checkpoint_context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """``context_fn`` of non-reentrant ``torch.utils.checkpoint``: nothing around the forward, the marker around
    the recomputation in backward."""
    return contextlib.nullcontext(), _recomputing()


@contextlib.contextmanager
def _recompute_marked(module: torch.nn.Module | None) -> Iterator[int]:
    """Inside: every gradient-checkpointed submodule of ``module`` recomputes under the marker; yields how many."""
    swapped = []
    for sub in module.modules() if module is not None else ():
        fn = getattr(sub, "_gradient_checkpointing_func", None)
        if not getattr(sub, "gradient_checkpointing", False) or fn is None:
            continue
        if not (isinstance(fn, functools.partial) and fn.func is torch.utils.checkpoint.checkpoint
                and fn.keywords.get("use_reentrant") is False):
            raise ValueError(f"{type(sub).__name__}: gradient checkpointing must be torch's non-reentrant checkpoint "
                             "for its recomputation to be left out of the FLOP count")
        swapped.append((sub, fn))
        sub._gradient_checkpointing_func = functools.partial(fn.func, *fn.args,
                                                             **{**fn.keywords, "context_fn": _checkpoint_context_fn})
    try:
        yield len(swapped)
    finally:
        for sub, fn in swapped:
            sub._gradient_checkpointing_func = fn


# ------------------------------------------------------------------------------------------------ attention formulas


def _attended_pairs(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> int:
    """Σ over batch and query heads of the (query, key) pairs the kernel lets attend.

    query [B, Hq, Sq, D], key [B, Hkv, Sk, D]; ``mask`` broadcastable to [B, Hq, Sq, Sk]: bool (True = attend) or
    additive float (-inf or the dtype's minimum = masked). ``is_causal`` is top-left aligned, as torch documents it.
    """
    b, hq, sq = int(query.shape[0]), int(query.shape[1]), int(query.shape[-2])
    sk = int(key.shape[-2])
    if mask is None:
        if not is_causal:
            return b * hq * sq * sk
        # Row i attends keys 0..i (at most Sk of them).
        n = min(sq, sk)
        return b * hq * (n * (n + 1) // 2 + (sq - n) * sk)
    # Additive masks mark a blocked pair with -inf or (transformers' eager masks) the dtype's minimum.
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if is_causal:   # not produced by SDPA's public API, but a kernel may be called with both
        allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril()
    per = allowed.sum(dim=(-2, -1), dtype=torch.int64)
    # A broadcast query or key axis (size 1) stands for the whole axis.
    per = per * (sq if allowed.shape[-2] == 1 else 1) * (sk if allowed.shape[-1] == 1 else 1)
    return int(torch.broadcast_to(per, (b, hq)).sum())


def _attention_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     is_causal: bool, *, backward: bool) -> int:
    pairs = _attended_pairs(query, key, mask, is_causal)
    forward = 2 * pairs * (int(query.shape[-1]) + int(value.shape[-1]))
    return 2 * forward if backward else forward


# Fused SDPA kernels: (aten op name, is a backward, name of its mask argument or None).
_SDPA_OPS: tuple[tuple[str, bool, str | None], ...] = (
    ("_scaled_dot_product_flash_attention", False, None),
    ("_scaled_dot_product_flash_attention_backward", True, None),
    ("_scaled_dot_product_efficient_attention", False, "attn_bias"),
    ("_scaled_dot_product_efficient_attention_backward", True, "attn_bias"),
    ("_scaled_dot_product_cudnn_attention", False, "attn_bias"),
    ("_scaled_dot_product_cudnn_attention_backward", True, "attn_bias"),
    ("_scaled_dot_product_flash_attention_for_cpu", False, "attn_mask"),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", True, "attn_mask"),
    ("_scaled_dot_product_fused_attention_overrideable", False, "attn_bias"),
    ("_scaled_dot_product_fused_attention_overrideable_backward", True, "attn_bias"),
)


def _sdpa_formula(packet: Any, backward: bool, mask_arg: str | None) -> Callable[..., int]:
    """A raw-argument formula for one SDPA kernel: binds its arguments by the op's schema (positions differ)."""
    schema = packet.default._schema
    names = [a.name for a in schema.arguments]
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}

    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        bound = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
        return _attention_flops(bound["query"], bound["key"], bound["value"],
                                bound.get(mask_arg) if mask_arg else None, bool(bound.get("is_causal", False)),
                                backward=backward)

    return formula


def _registry() -> dict[Any, Callable[..., int]]:
    """torch's shape-based formulas (matmuls, convolutions) with ours for every SDPA kernel this build has."""
    from torch.utils.flop_counter import flop_registry

    registry = dict(flop_registry)
    for name, backward, mask_arg in _SDPA_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            registry[packet] = _sdpa_formula(packet, backward, mask_arg)
    return registry


class _ModelFlopCounter(TorchDispatchMode):
    """Sums the registry's formulas over the ops a region dispatches, outside gradient-checkpoint recomputation."""

    def __init__(self, registry: dict[Any, Callable[..., int]]) -> None:
        super().__init__()
        self.registry = registry
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.registry.get(func._overloadpacket)
        if formula is not None and _RecomputeDepth.value == 0:
            self.by_op[func._overloadpacket.__name__] += int(formula(*args, **kwargs, out_val=out))
        return out


@dataclass
class ModelFlops:
    """Counted FLOPs of one call: ``total`` and per aten op (``attention`` = the SDPA kernels' share)."""

    total: int
    by_op: dict[str, int] = field(default_factory=dict)

    @property
    def attention(self) -> int:
        return sum(v for k, v in self.by_op.items() if "scaled_dot_product" in k)


def _fused_sdpa_only(device_type: str) -> contextlib.AbstractContextManager:
    """Keep SDPA on fused kernels while counting: the math fallback decomposes into plain matmuls over every
    (query, key) pair, which would count masked and causal-skipped pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION]
    if device_type == "cuda":
        backends += [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    return sdpa_kernel(backends)


def count_model_flops(step: Callable[[], Any], device_type: str = "cpu", module: torch.nn.Module | None = None,
                      warmup: bool = True) -> ModelFlops | None:
    """Model FLOPs of one call of ``step`` (forward, and backward if it calls it), by the module's convention.

    ``module``: the model ``step`` runs, if it may use gradient checkpointing (its recomputation is then left out).
    ``warmup``: call ``step`` once uncounted first, so that one-time set-up done on first use (the renderer's cached
    tile sampling grids, lazily built buffers) is not counted as per-step work.

    None, with a warning, when the step cannot be counted (no fused attention kernel fits, out of memory): the
    MFU is then null, never estimated.
    """
    counter = _ModelFlopCounter(_registry())
    try:
        if warmup:
            step()
        with _recompute_marked(module), _fused_sdpa_only(device_type), counter:
            step()
    except torch.OutOfMemoryError as err:
        logger.warning("FLOPs not counted (out of memory in the counted step: %s); MFU will be null",
                       str(err).splitlines()[0])
        return None
    except RuntimeError as err:
        if "No available kernel" not in str(err):
            raise
        logger.warning("FLOPs not counted (no fused attention kernel for this step: %s); MFU will be null",
                       str(err).splitlines()[0])
        return None
    return ModelFlops(total=sum(counter.by_op.values()), by_op=dict(counter.by_op))
