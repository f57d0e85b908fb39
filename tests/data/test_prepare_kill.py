"""A SIGKILLed prepare-data leaves no half-written image under a final name; the re-run equals an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from loopback_http import LoopbackServer
from prepare_helpers import folder_bytes, published_rows, synthetic_dataset, write_published

from panobench import cli
from panobench.data.prepare import url_key

pytestmark = pytest.mark.loopback


def test_sigkill_mid_download_then_rerun_equals_uninterrupted_run(tmp_path: Path) -> None:
    images, rows = synthetic_dataset(tmp_path / "synthetic", n_train=24, n_valid=8, n_test=8)
    # 40 ms before each answer and 40 ms half-way through each body: downloads are in flight when the kill lands.
    with LoopbackServer(latency_s=0.04, max_requests=500) as server:
        published = published_rows(server, images, rows)
        for route in server.routes.values():
            route.trickle_s = 0.04
        served = {url_key(server.url("/img/" + rel)): body for rel, body in images.items()}
        sources = write_published(tmp_path / "published", published)
        args = ["prepare-data", "--csv", sources["train"], sources["valid"], sources["test"], "--min-width", "64",
                "--min-height", "32", "--workers", "2", "--timeout", "5", "--no-progress"]
        out = tmp_path / "killed"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "panobench", *args, "--out", str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while len(list((out / "images").glob("*/[!.]*"))) < 8:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "no image stored within 120 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL

        # Every final name holds a complete image; the outputs were not written yet; temporary files are hidden.
        stored = {p.stem: p.read_bytes() for p in (out / "images").glob("*/[!.]*")}
        assert 8 <= len(stored) < len(images)
        assert all(body == served[key] for key, body in stored.items())
        assert not (out / "manifest.json").exists()
        partial = list((out / "images").glob("*/.*.part"))

        server.reset_counts()
        assert cli.main([*args, "--out", str(out)]) == 0
        refetched = {url_key(server.url(path)) for path in server.counts}
        assert not refetched & set(stored), "a stored image was downloaded again"
        assert len(refetched) == len(images) - len(stored)
        assert not list((out / "images").glob("*/.*"))

        assert cli.main([*args, "--out", str(tmp_path / "uninterrupted")]) == 0
        assert folder_bytes(out) == folder_bytes(tmp_path / "uninterrupted")
    print(f"killed after {len(stored)}/{len(images)} images stored, {len(partial)} partial download(s) left")
