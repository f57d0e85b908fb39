"""Tiling speed: torch ``grid_sample`` renderer vs ``py360convert.e2p`` (scipy path), ms per tile.

Default case: a 1024×512 uint8 ERP -> 8 tiles of 256² (FOV 90°, overlap 0.5). Both sides are warm (sampling grids
cached); the torch side renders the whole plan in one batched call. Prints a table, the speed-up and the max abs
difference between the two outputs.

    python benchmarks/tiling_speed.py [--device cuda] [--batch 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import py360convert
import py360convert.utils
import torch

from panobench.geometry.render import render_tiles
from panobench.geometry.tiling import plan_tiles


def _median_ms(fn, repeats: int, sync) -> float:
    fn()  # warm: build/cache grids, allocate
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="panoramas per torch call")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    py360convert.utils.cv2 = None  # pin the oracle's scipy path (it would silently switch to cv2.remap)

    rng = np.random.default_rng(0)
    erp_np = rng.integers(0, 256, size=(512, 1024, 3), dtype=np.uint8)
    plan = plan_tiles(0.5, fov_deg=90.0)
    size = 256
    device = torch.device(args.device)
    erp = torch.from_numpy(erp_np).permute(2, 0, 1).contiguous().to(device)
    batch = erp.unsqueeze(0).expand(args.batch, -1, -1, -1).contiguous()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def oracle():
        return [py360convert.e2p(erp_np, t.fov_deg, t.yaw_deg, t.pitch_deg, (size, size)) for t in plan.tiles]

    ours_ms = _median_ms(lambda: render_tiles(batch, plan, size), args.repeats, sync) / (plan.num_tiles * args.batch)
    ref_ms = _median_ms(oracle, max(3, args.repeats // 4), lambda: None) / plan.num_tiles

    ours = render_tiles(erp, plan, size).permute(0, 2, 3, 1).cpu().numpy().astype(int)
    ref = np.stack(oracle()).astype(int)
    max_diff = int(np.abs(ours - ref).max())
    frac_diff = float((ours != ref).mean())

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"ERP 1024x512 uint8 -> {plan.num_tiles} tiles {size}x{size}, FOV 90, overlap 0.5; torch {torch.__version__}")
    print(f"{'renderer':<52}{'ms/tile':>10}")
    print(f"{'py360convert.e2p (scipy map_coordinates)':<52}{ref_ms:>10.3f}")
    print(f"{f'panobench render_tiles, {name}, batch {args.batch}':<52}{ours_ms:>10.3f}")
    print(f"speed-up: {ref_ms / ours_ms:.1f}x   max |diff|: {max_diff} grey level(s) on {frac_diff:.2e} of values")


if __name__ == "__main__":
    main()
