"""Session fixture: a real one-node SLURM cluster (munged + slurmctld + slurmd) for tests/cluster.

The cluster is started by ``slurm_up.sh`` under a fresh state dir on free ports and stopped by
``slurm_down.sh``, which kills exactly the pids the daemons recorded. A failed bring-up fails the
test with the daemon logs; it never skips, so a broken cluster cannot pass CI unnoticed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_testcluster import SlurmCluster

CLUSTER_DIR = Path(__file__).resolve().parent
UP_TIMEOUT_S = 300  # includes an apt-get install of slurm-wlm/munge on a bare machine


def _free_port_pair() -> int:
    """A port p with p and p+1 free (slurmctld uses p, slurmd p+1)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of adjacent TCP ports for slurmctld/slurmd")


def _parse_exports(stdout: str) -> dict[str, str]:
    """``export NAME=value`` lines printed by slurm_up.sh -> {NAME: value}."""
    env = {}
    for line in stdout.splitlines():
        if line.startswith("export ") and "=" in line:
            name, value = line.removeprefix("export ").split("=", 1)
            env[name] = value
    return env


def _daemon_logs(state_dir: Path) -> str:
    parts = []
    for name in ("munged.log", "slurmctld.log", "slurmd.log"):
        log = state_dir / "log" / name
        text = log.read_text(errors="replace") if log.exists() else "(missing)"
        parts.append(f"----- {name} -----\n{text[-4000:]}")
    return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the test cluster once per session; stop it and remove its state dir afterwards."""
    if os.geteuid() != 0:
        pytest.fail("tests/cluster needs root: slurmd runs jobs as the submitting user, munged runs as user munge")
    # Not under pytest's tmp dir: that is mode 0700, and munged (user munge) must traverse to its socket.
    state_dir = Path("/tmp") / f"panobench-slurm-{uuid.uuid4().hex[:8]}"
    up_env = {**os.environ, "PANOBENCH_SLURM_DIR": str(state_dir), "PANOBENCH_SLURM_PORT": str(_free_port_pair())}
    down = [str(CLUSTER_DIR / "slurm_down.sh")]
    try:
        proc = subprocess.run(
            [str(CLUSTER_DIR / "slurm_up.sh")],
            env=up_env,
            capture_output=True,
            text=True,
            timeout=UP_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        logs = _daemon_logs(state_dir)
        subprocess.run(down, env=up_env, check=False)
        pytest.fail(f"slurm_up.sh did not finish in {UP_TIMEOUT_S}s ({exc})\n{logs}")
    if proc.returncode != 0:
        logs = _daemon_logs(state_dir)
        subprocess.run(down, env=up_env, check=False)
        pytest.fail(f"slurm_up.sh exited {proc.returncode}\nstderr:\n{proc.stderr}\n{logs}")
    exports = _parse_exports(proc.stdout)
    if "SLURM_CONF" not in exports:
        subprocess.run(down, env=up_env, check=False)
        pytest.fail(f"slurm_up.sh printed no SLURM_CONF export; stdout was:\n{proc.stdout}")
    cluster = SlurmCluster(state_dir=state_dir, env={**os.environ, **exports})
    node_cpus = cluster.run("sinfo", "-h", "-N", "-o", "%c").split()
    if node_cpus != [str(len(os.sched_getaffinity(0)))]:
        # A node with fewer CPUs than the machine leaves the profile's 2-CPU group jobs pending forever.
        subprocess.run(down, env=up_env, check=False)
        pytest.fail(f"test node declares CPUs {node_cpus}, this machine has {len(os.sched_getaffinity(0))}")
    try:
        yield cluster
    finally:
        result = subprocess.run(down, env=up_env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            pytest.fail(f"slurm_down.sh exited {result.returncode}: {result.stderr}")
