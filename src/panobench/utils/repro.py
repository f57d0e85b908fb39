"""Seeding and environment capture (versions, device, git revision) for run records."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA); dataloader workers are seeded by Lightning's worker_init_fn."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ.setdefault("PL_SEED_WORKERS", "1")


def package_versions() -> dict[str, str | None]:
    names = ["panobench", "torch", "transformers", "peft", "lightning", "tokenizers", "mamba-ssm", "causal-conv1d",
             "pycocoevalcap", "snakemake", "numpy", "pandas"]
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    # Which interpreter ran the job: inside a container image this is the image's Python, which is how a run
    # shows that it really ran in the image.
    out["python_executable"] = sys.executable
    out["cuda"] = torch.version.cuda
    return out


def git_revision(start: str | os.PathLike | None = None) -> str | None:
    """The git SHA of the checkout holding ``start`` (default: cwd), with ``-dirty`` if modified.

    ``$PANOBENCH_GIT_REVISION``, when set, wins: a copy of the tree shipped to another machine (a lent GPU machine)
    may carry no ``.git``, or a stale one from an earlier commit, and then only the sender knows the revision.
    Outside git and without the variable: None.
    """
    if os.environ.get("PANOBENCH_GIT_REVISION"):
        return os.environ["PANOBENCH_GIT_REVISION"]
    cwd = Path(start) if start else Path.cwd()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def device_description() -> dict[str, Any]:
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        return {"device": torch.cuda.get_device_name(idx), "device_type": "cuda",
                "device_count": torch.cuda.device_count()}
    return {"device": platform.processor() or platform.machine(), "device_type": "cpu", "device_count": 1}
