"""The handle tests get for the one-node SLURM test cluster (see conftest.py and slurm_up.sh)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SlurmCluster:
    """A running test cluster.

    Attributes:
        state_dir: Everything the cluster writes (config, logs, pid files).
        env: ``os.environ`` plus the variables slurm_up.sh printed (``SLURM_CONF``).
    """

    state_dir: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = 30) -> str:
        """Run a SLURM client command (``squeue``, ``scontrol``...) against this cluster; return stdout."""
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def diagnostics(self) -> str:
        """What a person debugging a stuck or failed cluster run looks at first: queue, node, daemon logs."""
        parts = []
        for args in (
            ("squeue", "-a", "-h", "-o", "%i %j %T %r %M %C %m"),
            ("sinfo", "-N", "-h", "-o", "%N %T %E %c %m"),
            ("scontrol", "show", "node", "-o"),
        ):
            proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30, check=False)
            parts.append(f"$ {' '.join(args)}\n{proc.stdout.strip()}{proc.stderr.strip()}")
        for name in ("slurmctld.log", "slurmd.log"):
            log = self.state_dir / "log" / name
            text = log.read_text(errors="replace") if log.exists() else "(missing)"
            parts.append(f"----- {name} (tail) -----\n{text[-3000:]}")
        return "\n".join(parts)

    def stuck_reason(self) -> str | None:
        """Why submitted work can never start, or None: the node is unusable or a job waits for what cannot come."""
        proc = subprocess.run(
            ("sinfo", "-N", "-h", "-o", "%T"), env=self.env, capture_output=True, text=True, timeout=30, check=False
        )
        states = proc.stdout.split()
        if proc.returncode != 0 or not states:
            return f"sinfo failed or lists no node: {proc.stderr.strip() or proc.stdout.strip()!r}"
        usable = {"idle", "mixed", "allocated", "completing"}
        if not any(state.rstrip("*~#") in usable for state in states):
            return f"no usable node (states {states})"
        proc = subprocess.run(
            ("squeue", "-h", "-t", "PENDING", "-o", "%i %r"), env=self.env, capture_output=True, text=True,
            timeout=30, check=False,
        )
        hopeless = ("PartitionConfig", "ReqNodeNotAvail", "NodeDown", "BadConstraints", "PartitionDown",
                    "InvalidAccount", "QOSMaxCpuPerJobLimit", "AssocMaxCpuPerJobLimit")
        for line in proc.stdout.splitlines():
            job_id, _, reason = line.partition(" ")
            if reason.startswith(hopeless):
                return f"job {job_id} pends with reason {reason}"
        return None


@dataclass
class ClusterRun:
    """A finished (or killed) ``snakemake --profile ...`` run on the test cluster."""

    returncode: int
    log: str
    wall_s: float
    problem: str  # empty when snakemake ended on its own; else why the test stopped it


def run_on_cluster(
    cluster: SlurmCluster, args: list[str], cwd: Path, env: dict[str, str], timeout_s: float,
    stuck_grace_s: float = 120,
) -> ClusterRun:
    """Run a command (snakemake with a SLURM profile) and watch the cluster while it runs.

    The slurm plugin ignores SIGTERM while it polls and waits forever for a job that never starts, so a plain
    timeout turns a stuck queue into a long, silent failure. Here the cluster is checked every few seconds; if it
    stays unable to run the submitted work for ``stuck_grace_s`` (node down/drained, a job pending for a reason
    that cannot clear), or ``timeout_s`` passes, the whole process group is killed and ``problem`` says why.
    """
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        problem, stuck_since = "", None
        while proc.poll() is None:
            time.sleep(3)
            elapsed = time.monotonic() - start
            reason = cluster.stuck_reason()
            stuck_since = (stuck_since or time.monotonic()) if reason else None
            if reason and time.monotonic() - stuck_since > stuck_grace_s:
                problem = f"cluster cannot run the submitted work for {stuck_grace_s:.0f} s: {reason}"
            elif elapsed > timeout_s:
                problem = f"no result after {timeout_s:.0f} s"
            if problem:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
        out.seek(0)
        log = out.read()
    return ClusterRun(proc.returncode, log, time.monotonic() - start, problem)


def failure_message(cluster: SlurmCluster, run: ClusterRun, tail: int = 6000) -> str:
    what = run.problem or f"exited {run.returncode}"
    return f"snakemake on the test cluster: {what} ({run.wall_s:.0f} s)\n{run.log[-tail:]}\n{cluster.diagnostics()}"
