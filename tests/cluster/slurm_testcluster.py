"""The handle tests get for the one-node SLURM test cluster (see conftest.py and slurm_up.sh)."""

from __future__ import annotations

import subprocess
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
