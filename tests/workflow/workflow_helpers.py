"""Shared helpers for workflow tests: a scratch copy of the workflow and a Snakemake runner.

(A uniquely named module: several test folders have a ``conftest``, so tests never import from one.)

Each test runs Snakemake in a fresh directory holding the repository's workflow files (Snakefile, rules/,
config/, reports/), exactly as a user's checkout would, so generated outputs never touch the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKFLOW_FILES = ["Snakefile", "rules", "config", "reports/workflow.rst", "reports/captions"]
SMALL_CONFIG = REPO / "tests" / "workflow" / "config" / "small.yaml"


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow definition into ``dest`` (a user's checkout minus the package source)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, dirs_exist_ok=True)
        else:
            shutil.copy2(src, target)
    shutil.copy2(SMALL_CONFIG, dest / "config" / "small.yaml")
    return dest


def snakemake_env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("PYTHONHASHSEED", "0")
    return env


def run_snakemake(workdir: Path, *args: str, timeout: int = 1800, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m snakemake ARGS`` in ``workdir``; on failure the assertion shows its output and job logs."""
    cmd = [sys.executable, "-m", "snakemake", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=snakemake_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(workdir.glob("logs/**/*.log")))
        pytest.fail(f"snakemake {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
                    f"\n{logs[-8000:]}")
    return proc
