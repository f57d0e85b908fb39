"""Speed, memory and cost measurement: step-time statistics, peak memory, counted FLOPs, MFU.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one real forward+backward step (not
estimated by hand). MFU = counted FLOPs per step / median step time / the device's bf16 dense peak, where the peak
is measured on the device (a large bf16 matmul) unless the config gives it.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

GIB = float(1 << 30)


def summarize_step_times(times_s: list[float], warmup: int) -> dict[str, Any]:
    """Median/p90 over the steps after ``warmup`` (all steps if too few remain)."""
    measured = times_s[warmup:] if len(times_s) > warmup else list(times_s)
    if not measured:
        return {"measured_steps": 0, "step_time_median_s": None, "step_time_p90_s": None}
    ordered = sorted(measured)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"measured_steps": len(measured), "step_time_median_s": statistics.median(measured), "step_time_p90_s": p90}


def peak_host_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return max(rss * scale, psutil.Process().memory_info().rss) / GIB


def reset_peak_gpu_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_memory_gib() -> dict[str, float | None]:
    if not torch.cuda.is_available():
        return {"peak_gpu_allocated_gib": None, "peak_gpu_reserved_gib": None}
    return {"peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB}


def count_flops(step: Callable[[], Any]) -> int | None:
    """FLOPs of one call of ``step`` (forward and backward if it calls backward); None, logged, when torch's
    counter cannot count an op (seen on an H200, torch 2.11: SDPA with grouped-query heads and no mask, i.e. Qwen3
    at batch 1, asserts in ``sdpa_flop_count``): MFU is then reported as null, never estimated."""
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    except AssertionError as err:
        logger.warning("FLOPs not counted (torch flop counter: %s); MFU will be null", err)
        return None
    return int(counter.get_total_flops())


_PEAK_CACHE: dict[str, float] = {}


def measure_bf16_matmul_peak(device: torch.device | str = "cuda", n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 dense matmul throughput (FLOP/s) on ``device``: the MFU denominator."""
    key = str(device)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1000.0 / repeats
    peak = 2.0 * n**3 / seconds
    _PEAK_CACHE[key] = peak
    logger.info("measured bf16 matmul peak on %s: %.1f TFLOP/s", torch.cuda.get_device_name(device), peak / 1e12)
    return peak


def device_peak_flops(configured_tflops: float | None) -> float | None:
    """The MFU denominator: the configured value, else measured on CUDA, else None (CPU: MFU not reported)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if torch.cuda.is_available():
        return measure_bf16_matmul_peak()
    return None


class StepClock:
    """Wall time of each training step (synchronising CUDA so queued kernels are counted)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0: float | None = None

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)
        self._t0 = None
