"""One Mamba layer, forward + backward: the pure-PyTorch reference scan vs mamba-ssm's fused CUDA kernels.

Default case is SPEC §8's: d_model 1152, batch 8, sequence lengths 1280 and 2304 (5 and 9 views × 256 tokens).
Both paths run on the same ``MambaReference`` parameters (the fused path calls mamba-ssm's functional kernels
on them, as the bimamba resampler does). Prints a table of median ms per fwd+bwd, peak CUDA memory and the max
abs difference between the two paths' outputs; the fused rows appear only on CUDA with mamba-ssm installed.

    python benchmarks/mamba_layer.py                                   # GPU, full size
    python benchmarks/mamba_layer.py --device cpu --d-model 64 --batch 2 --lengths 128 256 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from panobench.errors import ConfigError
from panobench.models.resamplers.bimamba import _mamba_kernels, fused_mamba_forward
from panobench.models.resamplers.mamba_ref import MambaReference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time_fwd_bwd(fn, x: torch.Tensor, repeats: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """Median ms of one forward+backward, and peak CUDA memory (GiB; nan on CPU)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step() -> None:
        x.grad = None
        fn(x).float().square().mean().backward()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--d-model", type=int, default=1152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1280, 2304])
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, default=16, help="reference scan chunk T")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--paths", nargs="+", choices=["reference", "mamba_ssm"], default=["reference", "mamba_ssm"])
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    layer = MambaReference(args.d_model, d_state=args.d_state, chunk_size=args.chunk_size).to(device)
    paths = {"reference": layer}
    if "mamba_ssm" in args.paths and device.type == "cuda":
        try:
            kernels = _mamba_kernels()
            paths["mamba_ssm"] = lambda x: fused_mamba_forward(layer, x)
            print(f"mamba_ssm kernels found (causal-conv1d: {kernels.has_causal_conv1d})")
        except ConfigError as exc:
            print(f"fused path skipped: {exc}")
    paths = {name: fn for name, fn in paths.items() if name in args.paths}
    autocast_dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32

    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}) "
          f"d_model={args.d_model} d_state={args.d_state} batch={args.batch} dtype={autocast_dtype} "
          f"chunk={args.chunk_size} threads={torch.get_num_threads()} torch={torch.__version__}")
    print(f"{'path':<10} {'L':>6} {'fwd+bwd ms':>12} {'peak GiB':>9} {'max |Δ| vs ref':>15}")
    for length in args.lengths:
        x = torch.randn(args.batch, length, args.d_model, device=device, requires_grad=True)
        outputs = {}
        for name, fn in paths.items():
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=device.type == "cuda"):
                ms, peak = _time_fwd_bwd(fn, x, args.repeats, args.warmup, device)
                with torch.no_grad():
                    outputs[name] = fn(x).float()
            diff = (outputs[name] - outputs["reference"]).abs().max().item() if "reference" in outputs else float("nan")
            print(f"{name:<10} {length:>6} {ms:>12.1f} {peak:>9.2f} {diff:>15.3g}")


if __name__ == "__main__":
    main()
