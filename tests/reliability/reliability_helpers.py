"""Shared fixtures for the reliability battery: scratch workflow runs reused by every test of a session.

The expensive part is running the workflow, so each run happens once per session and several tests read it:

- ``reference_run``: the reliability config (2 cells sharing one stage-1 recipe, ``--cores 2``) run uninterrupted.
  Read by the interruption, determinism, concurrency and "writes only where configured" tests.
- ``interrupted_run``: the same config and one cell's outputs, SIGKILLed (whole process group) in the middle of
  stage 2, again during ``generate`` and again during ``score``; each time re-run with ``--rerun-incomplete``.
- ``keep_going_run``: one cell whose stage-1 checkpoint is a corrupt file and one good cell, ``--keep-going``.

Every subprocess gets ``OMP_NUM_THREADS=1``: two jobs on two cores must not oversubscribe them.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[2]


def _workflow_helpers() -> Any:
    """tests/workflow/workflow_helpers.py (copy_workflow, run_snakemake), loaded under its own module name."""
    spec = importlib.util.spec_from_file_location("panobench_workflow_helpers",
                                                  REPO / "tests" / "workflow" / "workflow_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_wf = _workflow_helpers()
copy_workflow, run_snakemake, snakemake_env = _wf.copy_workflow, _wf.run_snakemake, _wf.snakemake_env

NAME = "small"
# Cells of the reliability config (see reliability_config); the recipe is shared by both.
CELL_A = "ov0.00_fov90_mlp_vis-vicreg_seed0"
CELL_B = "ov0.50_fov90_mlp_vis-vicreg_seed0"
RECIPE = "vision-vicreg"
KILLED_CELL = CELL_B          # 8 + 1 views: the slower cell, so the kill lands mid-stage reliably
OUTPUT_DIRS = {"data", "resources", "results", "runs", "logs", "benchmarks", "reports", ".snakemake"}


def reliability_config(**changes: Any) -> dict[str, Any]:
    """tests/workflow/config/small.yaml plus a shared stage-1 recipe, 6 stage-2 steps and one eval stage."""
    cfg = yaml.safe_load((REPO / "tests" / "workflow" / "config" / "small.yaml").read_text())
    cfg["matrix"]["vision_checkpoints"] = [{"name": "vicreg", "train": {"overlap": 0.5, "resampler": "mlp", "seed": 0}}]
    cfg["eval_stages"] = ["finetune"]
    cfg["run"]["stages"]["resampler"].update(max_steps=6, val_every_n_steps=3)
    for key, value in changes.items():
        cfg[key] = value
    return copy.deepcopy(cfg)


def write_config(workdir: Path, cfg: dict[str, Any], name: str = "reliability.yaml") -> str:
    path = workdir / "config" / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"config/{name}"


def stage_dir(workdir: Path, cell: str, stage: str) -> Path:
    return workdir / "runs" / NAME / cell / stage / "anyres-e2p_mlp"


def eval_dir(workdir: Path, cell: str, stage: str = "finetune") -> Path:
    return workdir / "runs" / NAME / cell / "eval" / stage


def all_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@dataclass
class WorkflowRun:
    workdir: Path
    configfile: str
    stdout: str = ""
    returncode: int = 0
    before: set[Path] = field(default_factory=set)   # files present before snakemake ran (the checkout)
    kills: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ process control
def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL snakemake, its job shells and the panobench processes: no handler runs, nothing is cleaned up."""
    victims = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # started with start_new_session: pgid == pid
    except ProcessLookupError:
        pass
    for pid in victims:   # in case a job moved to its own process group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def run_until_then_kill(workdir: Path, args: list[str], condition: Callable[[], dict[str, Any] | None],
                        timeout: float = 900) -> dict[str, Any]:
    """Start snakemake in its own session; poll ``condition`` every 20 ms and SIGKILL everything once it holds.

    Returns what ``condition`` returned (a description of the state at the kill).
    """
    log = open(workdir / "killed-run.out", "a")
    proc = subprocess.Popen([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=snakemake_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            state = condition()
            if state is not None:
                kill_tree(proc)
                return state
            if proc.poll() is not None:
                raise AssertionError(f"snakemake ended (exit {proc.returncode}) before the kill condition held; "
                                     f"see {workdir / 'killed-run.out'}")
            time.sleep(0.02)
        raise AssertionError("kill condition never held")
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        log.close()


# ------------------------------------------------------------------------------------------------ session runs
@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> WorkflowRun:
    """The reliability config run once, uninterrupted, with ``--cores 2`` (both cells may train concurrently)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("reference") / "wf")
    configfile = write_config(workdir, reliability_config())
    before = all_files(workdir)
    proc = run_snakemake(workdir, "--cores", "2", "--configfile", configfile, check=False)
    (workdir.parent / "snakemake.out").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"reference run failed; full output in {workdir.parent / 'snakemake.out'}"
    return WorkflowRun(workdir, configfile, proc.stdout + proc.stderr, proc.returncode, before)


def _stage2_mid_run() -> Callable[[Path], dict[str, Any] | None]:
    def check(workdir: Path) -> dict[str, Any] | None:
        d = stage_dir(workdir, KILLED_CELL, "resampler")
        if (d / "last.ckpt").is_file() and not (d / "measurements.json").exists():
            return {"phase": "train_resampler", "files": sorted(p.name for p in d.iterdir())}
        return None
    return check


def _job_running(command: str, outputs: list[str]) -> Callable[[Path], dict[str, Any] | None]:
    """Holds once a ``panobench COMMAND`` process of the workflow has run for a second (model built / scorer
    started) and the job's outputs do not exist yet."""
    import psutil

    def check(workdir: Path) -> dict[str, Any] | None:
        out = eval_dir(workdir, KILLED_CELL)
        if any((out / o).exists() for o in outputs):
            return None
        for p in psutil.process_iter(["cmdline", "cwd", "create_time"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if f"panobench {command} " in cmd and KILLED_CELL in cmd and p.info["cwd"] == str(workdir) \
                    and time.time() - p.info["create_time"] > 1.0:
                return {"phase": command}
        return None
    return check


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> WorkflowRun:
    """The killed cell of the reliability config, hard-killed three times and resumed each time.

    1. SIGKILL while stage 2 trains (``last.ckpt`` exists, ``measurements.json`` does not);
    2. SIGKILL during ``generate``; 3. SIGKILL during ``score``. After each kill the eval directory is inspected
    (recorded in ``kills``), then ``snakemake --rerun-incomplete`` continues; the last rerun runs to completion.
    """
    workdir = copy_workflow(tmp_path_factory.mktemp("interrupted") / "wf")
    configfile = write_config(workdir, reliability_config())
    target = f"runs/{NAME}/{KILLED_CELL}/eval/finetune/metrics.json"
    args = ["--cores", "2", "--configfile", configfile, "--rerun-incomplete", target]
    run = WorkflowRun(workdir, configfile)
    conditions = [
        (lambda: _stage2_mid_run()(workdir)),
        (lambda: _job_running("generate", ["predictions.csv"])(workdir)),
        (lambda: _job_running("score", ["metrics.json"])(workdir)),
    ]
    for condition in conditions:
        state = run_until_then_kill(workdir, args, condition)
        d = stage_dir(workdir, KILLED_CELL, "resampler")
        state["stage2_last_step"] = _global_step(d / "last.ckpt") if (d / "last.ckpt").is_file() else None
        out = eval_dir(workdir, KILLED_CELL)
        state["eval_files"] = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} if out.is_dir() else {}
        run.kills.append(state)
        # A SIGKILLed snakemake cannot remove its lock; unlocking is the documented first step of a restart.
        run_snakemake(workdir, "--unlock", "--configfile", configfile)
    proc = run_snakemake(workdir, *args)
    run.stdout, run.returncode = proc.stdout + proc.stderr, proc.returncode
    return run


def _global_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="session")
def keep_going_run(tmp_path_factory: pytest.TempPathFactory) -> WorkflowRun:
    """Two cells at overlap 0: ``vicreg`` (good: the reference run's CELL_A) and ``broken`` whose stage-1
    checkpoint is a corrupt file; run with ``--keep-going``."""
    workdir = copy_workflow(tmp_path_factory.mktemp("keepgoing") / "wf")
    (workdir / "resources").mkdir()
    (workdir / "resources" / "broken.ckpt").write_bytes(b"PK\x03\x04 this is not a torch checkpoint")
    cfg = reliability_config()
    cfg["matrix"]["overlaps"] = [0.0]
    cfg["matrix"]["vision_checkpoints"].append({"name": "broken", "path": "resources/broken.ckpt"})
    configfile = write_config(workdir, cfg)
    proc = run_snakemake(workdir, "--cores", "2", "--keep-going", "--configfile", configfile, check=False)
    return WorkflowRun(workdir, configfile, proc.stdout + proc.stderr, proc.returncode)
