"""Speed and memory measurement: step-time statistics, peak memory, the device's measured bf16 matmul rate.

Model FLOPs and the MFU convention live in :mod:`panobench.measurement.flops`; the measured matmul rate here is
only the denominator of the separately named ``mfu_measured_peak``.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from typing import Any

import psutil
import torch

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


_PEAK_CACHE: dict[str, float] = {}


def measure_bf16_matmul_peak(device: torch.device | str = "cuda", n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 dense matmul throughput (FLOP/s) on ``device``: the denominator of ``mfu_measured_peak``.

    Random operands (zeros run faster on Hoppers), three untimed products, then the mean of ``repeats`` timed with
    CUDA events on that device's stream.
    """
    device = torch.device(device)
    key = str(device)
    if key in _PEAK_CACHE:
        return _PEAK_CACHE[key]
    with torch.cuda.device(device):
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
    del a, b
    peak = 2.0 * n**3 / seconds
    _PEAK_CACHE[key] = peak
    logger.info("measured bf16 matmul peak on %s: %.1f TFLOP/s", torch.cuda.get_device_name(device), peak / 1e12)
    return peak


def measured_peak_flops() -> float | None:
    """The bf16 matmul rate measured on this process's CUDA device; None on a CPU."""
    return measure_bf16_matmul_peak(torch.device("cuda", torch.cuda.current_device())) \
        if torch.cuda.is_available() else None


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
