"""prepare-data wall time: synthetic panoramas from a loopback HTTP server, one download thread vs many.

The server (``tests/data/loopback_http.py``, 127.0.0.1 only) waits a fixed latency before every answer (default
30 ms), a stand-in for the network round trip that dominates real downloads: without it a loopback fetch takes well
under a millisecond and concurrency could not matter. The images are 64x32 synthetic ERPs, so decoding and hashing
are negligible next to the latency. Each setting prepares into a fresh folder; a re-run of the last one measures
resume (every image reused, no request). CPU-light: the default run takes a few seconds.

    python benchmarks/prepare_data_speed.py [--images 200] [--latency-ms 30] [--workers 1 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "data"))  # the loopback server and dataset helpers of the tests

from loopback_http import LoopbackServer  # noqa: E402
from prepare_helpers import published_rows, synthetic_dataset, write_published  # noqa: E402

from panobench.data.prepare import FetchPolicy, ImagePolicy, prepare_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="distinct images (80%% train, 10%% valid, 10%% test)")
    parser.add_argument("--latency-ms", type=float, default=30.0, help="server latency before every answer")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    n_valid = n_test = max(1, args.images // 10)
    n_train = args.images - n_valid - n_test

    with tempfile.TemporaryDirectory(prefix="prepare-speed-") as tmp_name:
        tmp = Path(tmp_name)
        images, rows = synthetic_dataset(tmp / "synthetic", n_train=n_train, n_valid=n_valid, n_test=n_test)
        with LoopbackServer(latency_s=args.latency_ms / 1000, max_requests=10 * args.images) as server:
            sources = write_published(tmp / "published", published_rows(server, images, rows))
            policy = ImagePolicy(min_width=64, min_height=32)
            print(f"{len(images)} distinct 64x32 images, {sum(len(r) for r in rows.values())} CSV rows, "
                  f"server latency {args.latency_ms:g} ms per request (127.0.0.1)")
            print(f"{'workers':>8} {'wall s':>8} {'images/s':>9} {'requests':>9}")
            out = tmp / "unused"
            for workers in args.workers:
                out = tmp / f"out-w{workers}"
                server.reset_counts()
                start = time.perf_counter()
                prepare_data(sources, out, image_policy=policy, fetch_policy=FetchPolicy(workers=workers),
                             progress=False)
                wall = time.perf_counter() - start
                print(f"{workers:>8} {wall:>8.2f} {len(images) / wall:>9.1f} {server.total_requests():>9}")
            server.reset_counts()
            start = time.perf_counter()
            result = prepare_data(sources, out, image_policy=policy, fetch_policy=FetchPolicy(workers=args.workers[-1]),
                                  progress=False)
            print(f"re-run of the last folder (resume): {time.perf_counter() - start:.2f} s, "
                  f"{server.total_requests()} requests, {result.reused} images reused, {result.downloaded} downloaded")


if __name__ == "__main__":
    main()
