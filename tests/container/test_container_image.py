"""The container recipe, executed: the CI image runs the workflow through ``snakemake --use-apptainer``.

The image (conftest ``container_image``, built by rootfs_builder) is containers/panobench.def's recipe executed in a
Debian root filesystem: ``%files``, ``install.sh`` (CPU mode) for ``%post``, ``%environment`` and ``%test``. Then
``tests/config/small.yaml`` runs twice at the same time: once with ``--use-apptainer`` and the bubblewrap launcher as
``apptainer`` on PATH, once on the host (the session's ``small_local_run``, tests/conftest.py, which tests/cluster
compares its SLURM run with too). The checks: every job of the DAG went through the launcher into this
image, the image's interpreter ran the commands (the launcher's log and the runs' own version records), and both
runs report the same captions and caption metrics.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from apptainer_deffile import INSTALL_SCRIPT, REPO_ROOT, load_def
from apptainer_launcher import LOG_ENV
from rootfs_builder import INSTALL_ARGS, Image

from panobench.evaluation.metrics import METRIC_NAMES
from panobench.utils.repro import package_versions

pytestmark = [pytest.mark.container, pytest.mark.workflow, pytest.mark.slow]

LAUNCHER_DIR = Path(__file__).resolve().parent / "bin"
RUN_TIMEOUT_S = 1200
IMAGE_PYTHON = "/opt/venv/bin/python"  # install.sh's venv; pip wrote it into `panobench`'s entry point
# The caption columns of results.csv: each metric, the baseline's and the difference, and what the captions are.
CAPTION_COLUMNS = (
    *METRIC_NAMES,
    *(f"baseline_{m}" for m in METRIC_NAMES),
    *(f"delta_{m}" for m in METRIC_NAMES),
    *(f"blind_{m}" for m in METRIC_NAMES),
    *(f"delta_blind_{m}" for m in METRIC_NAMES),
    "num_groups",
    "empty_predictions",
    "mean_prediction_length_words",
)


def _workflow_helpers():
    """tests/workflow/workflow_helpers.py (copy_workflow, snakemake_env, run_snakemake) under a name of its own."""
    spec = importlib.util.spec_from_file_location(
        "_panobench_workflow_helpers_container", REPO_ROOT / "tests/workflow/workflow_helpers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WF = _workflow_helpers()


def _step_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("+ ")]


def test_ci_image_ran_every_step_of_the_recipe(container_image: Image) -> None:
    """The build executed install.sh's CPU-mode steps, all of them, and %test passed on the finished image."""
    log = container_image.log.read_text(errors="replace")
    post = log.split("=== %post: install.sh (CPU mode):", 1)[1].split("\n=== ", 1)[0]
    plan = subprocess.run(["bash", str(INSTALL_SCRIPT), *INSTALL_ARGS, "--dry-run"], capture_output=True, text=True,
                          check=True).stdout
    assert _step_lines(post) == _step_lines(plan)
    assert any("apt-get install" in line and "default-jre-headless" in line for line in _step_lines(post))
    test_out = log.split("=== %test: apptainer test", 1)[1]
    assert "mode cpu torch 2.13.0+cpu cuda None" in test_out, test_out[-3000:]
    assert "caption metrics:" in test_out  # %test scored captions with Java in the read-only image
    for _, dest in load_def().files():  # %files were copied
        assert (container_image.path / dest.lstrip("/")).exists(), dest


def test_ci_image_has_the_hosts_versions(container_image: Image) -> None:
    """Same torch build (the host's local CPU wheel) and, resolved from pyproject.toml, the same libraries."""
    frozen = {
        name.lower().replace("_", "-"): version
        for name, version in (line.split("==", 1) for line in container_image.record["pip_freeze"] if "==" in line)
    }
    assert frozen.get("torch") == "2.13.0+cpu"
    # panobench itself is %files' copy of this checkout (part of the cache key), installed from a path.
    skip = ("python", "python_executable", "cuda", "panobench")
    host = {name: version for name, version in package_versions().items() if name not in skip}
    drift = {name: (host[name], frozen.get(name)) for name in host if host[name] != frozen.get(name)}
    assert not drift, f"(host, image) versions differ, so results cannot be compared like for like: {drift}"


def test_ci_image_holds_nothing_of_the_build_host(container_image: Image, tmp_path: Path) -> None:
    """The proxy's CA bundle and the host's pip settings reached the build only through /run (a tmpfs)."""
    root = container_image.path
    pip_configs = ["etc/pip.conf", "etc/xdg/pip", "root/.config/pip", "root/.pip", "opt/venv/pip.conf"]
    assert [p for p in pip_configs if (root / p).exists()] == []
    assert not (root / "run/panobench-build").exists() and not (root / "opt/wheels").exists()
    assert (root / "etc/resolv.conf").read_text() == ""
    assert "PIP_" not in (root / ".singularity.d/env/90-environment.sh").read_text()
    leaks = subprocess.run(["grep", "-rl", "panobench-build", str(root / "etc"), str(root / "opt"),
                            "--include=*.json", "--include=*.conf", "--include=*.cfg", "--include=*.txt",
                            "--include=RECORD", "--include=INSTALLER"], capture_output=True, text=True)
    assert leaks.stdout == "", leaks.stdout
    # Inside the image, with no PIP_* variables and an empty home (the default home is the host's, whose pip.conf
    # Apptainer would show too), pip has no settings at all.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    (tmp_path / "home").mkdir()
    listed = subprocess.run([str(LAUNCHER_DIR / "apptainer"), "exec", "--home", str(tmp_path / "home"), str(root),
                             "pip", "config", "list"], capture_output=True, text=True, env=env, check=True)
    assert listed.stdout.strip() == "", listed.stdout


def test_launcher_gives_apptainers_view_of_the_image(container_image: Image, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Read-only image; home, working directory and /tmp bound from the host; %environment applied."""
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("TMPDIR", raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/host/lib")
    monkeypatch.setenv("APPTAINERENV_PANOBENCH_PROBE", "set-by-apptainerenv")
    script = ("touch /opt/probe 2>/dev/null && echo image=writable || echo image=read-only; "
              "echo home=$HOME pwd=$(pwd) path=$PATH; echo tmpdir=$TMPDIR nousersite=$PYTHONNOUSERSITE; "
              "echo ld=${LD_LIBRARY_PATH:-unset} probe=$PANOBENCH_PROBE; "
              "echo in-cwd > cwd.txt; echo in-home > $HOME/home.txt; echo in-tmp > " + str(tmp_path / "tmp.txt"))
    proc = subprocess.run([str(LAUNCHER_DIR / "apptainer"), "exec", "--home", str(home), str(container_image.path),
                           "bash", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = dict(item.split("=", 1) for item in proc.stdout.split())
    assert out["image"] == "read-only" and not (container_image.path / "opt/probe").exists()
    assert out["home"] == str(home) and out["pwd"] == str(work)
    assert out["path"].startswith("/opt/venv/bin:/usr/local/sbin:")  # %environment on Apptainer's default PATH
    assert out["tmpdir"] == "/tmp" and out["nousersite"] == "1"
    assert out["ld"] == "unset" and out["probe"] == "set-by-apptainerenv"
    assert (work / "cwd.txt").read_text() == "in-cwd\n" and (home / "home.txt").read_text() == "in-home\n"
    assert (tmp_path / "tmp.txt").read_text() == "in-tmp\n"


def _job_stats(output: str) -> collections.Counter:
    stats = re.search(r"Job stats:\n(.*?)\n\s*total\s+(\d+)", output, re.S)
    assert stats, output[-4000:]
    return collections.Counter({m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", stats.group(1), re.M)})


def _records(workdir: Path) -> list[Path]:
    return sorted(workdir.glob("runs/small/*/*/anyres-e2p_*/measurements.json")) + sorted(
        workdir.glob("runs/small/*/eval/*/generation.json"))


def _executable(record: Path) -> str:
    data = json.loads(record.read_text())
    versions = data["env"]["versions"] if "env" in data else data["versions"]
    return versions["python_executable"]


def test_workflow_through_apptainer_matches_host_run(small_local_run, container_image: Image, tmp_path: Path,
                                                     measured) -> None:
    image = container_image.path
    box_wd = WF.copy_workflow(tmp_path / "apptainer")
    launcher_log = tmp_path / "launcher.jsonl"
    common = ["--cores", "2", "--configfile", "config/small.yaml"]
    env = {**WF.snakemake_env(), "PATH": f"{LAUNCHER_DIR}:{os.environ['PATH']}", LOG_ENV: str(launcher_log)}
    start = time.monotonic()
    # The host run is tests/conftest.py's small_local_run (tests/cluster compares its SLURM run with it too): started
    # by whichever of the two tests comes first, it runs beside that test's own run.
    box = subprocess.run([sys.executable, "-m", "snakemake", *common, "--use-apptainer", "--config",
                          f"container={image}"], cwd=box_wd, env=env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    box_s = time.monotonic() - start
    host_wd = small_local_run.result()
    wall_s = time.monotonic() - start
    output = box.stdout + box.stderr
    job_logs = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(box_wd.glob("logs/**/*.log")))
    assert box.returncode == 0, f"snakemake --use-apptainer exited {box.returncode}\n{output[-6000:]}\n{job_logs[-6000:]}"
    # The CI log shows whether this run paid for the image, and the cost of the two runs.
    phases = ", ".join(f"{name} {s:.0f} s" for name, s in container_image.record["phases_s"].items())
    measured(f"container image {'built now' if container_image.built_now else 'cached'} ({phases}); small.yaml "
             f"through --use-apptainer: {box_s:.0f} s, the shared host run done {wall_s:.0f} s after it started")

    # --- every job of the DAG ran through the launcher, in this image ---
    stats = _job_stats(output)
    assert stats["train_finetune"] == 2 and stats["score"] == 1, stats
    records = [json.loads(line) for line in launcher_log.read_text().splitlines()]
    execs = [r for r in records if r["action"] == "exec"]
    for rule, count in stats.items():
        if rule == "all":  # no shell command: it only collects the targets
            continue
        ran = [r for r in execs if re.search(rf"logs/small/{rule}[/.]", r["command"][-1])]
        assert len(ran) == count, f"{rule}: {count} jobs, {len(ran)} launcher runs"
    assert len(execs) == sum(stats.values()) - stats["all"]
    for r in execs:
        assert r["image"] == str(image) and r["exit_code"] == 0, r
        assert r["command"][:2] == ["bash", "-c"] and r["home"]["src"] == str(box_wd) == r["cwd"], r
        assert r["in_image"]["panobench"] == "/opt/venv/bin/panobench", r
        assert r["in_image"]["panobench_interpreter"] == IMAGE_PYTHON, r
    assert (image / IMAGE_PYTHON.lstrip("/")).exists() and sys.executable != IMAGE_PYTHON

    # --- the runs' own records name the interpreter: the image's in the container run, the host's otherwise ---
    box_records, host_records = _records(box_wd), _records(host_wd)
    small = yaml.safe_load((box_wd / "config/small.yaml").read_text())
    per_cell = 2 + len(small["eval_stages"])   # measurements of the 2 training stages, one record per evaluation
    assert len(box_records) == len(host_records) == 2 * per_cell
    assert {_executable(r) for r in box_records} == {IMAGE_PYTHON}
    assert IMAGE_PYTHON not in {_executable(r) for r in host_records}

    # --- the same captions and caption metrics ---
    got = pd.read_csv(box_wd / "reports/small/results.csv").sort_values(["cell_id", "stage"]).reset_index(drop=True)
    want = pd.read_csv(host_wd / "reports/small/results.csv").sort_values(["cell_id", "stage"]).reset_index(drop=True)
    assert list(got.columns) == list(want.columns) and len(got) == len(want) == 4
    assert set(CAPTION_COLUMNS) <= set(got.columns)
    assert (got["status"] == "ok").all() and got["CIDEr"].notna().any()
    pd.testing.assert_frame_equal(got[["cell_id", "stage", *CAPTION_COLUMNS]],
                                  want[["cell_id", "stage", *CAPTION_COLUMNS]], check_exact=True)
    # SPICE is skipped in both runs (no CoreNLP jars); each evaluated row's reason names the pycocoevalcap that
    # looked for them: the image's in the container run.
    assert got["SPICE"].isna().all() and want["SPICE"].isna().all()
    assert got["SPICE_reason"].isna().equals(want["SPICE_reason"].isna()) and got["SPICE_reason"].notna().any()
    image_lib = "not found in /opt/venv/lib/python3.11/site-packages/pycocoevalcap/spice/lib"
    assert got["SPICE_reason"].dropna().str.contains(image_lib, regex=False).all()
    assert not want["SPICE_reason"].dropna().str.contains(image_lib, regex=False).any()
    predictions = sorted(host_wd.glob("runs/small/*/eval/*/predictions.csv"))
    assert len(predictions) == 2 * len(small["eval_stages"])
    for pred in predictions:
        rel = pred.relative_to(host_wd)
        assert (box_wd / rel).read_bytes() == pred.read_bytes(), f"{rel} differs between container and host runs"
    assert (box_wd / "reports/small/report.html").stat().st_size > 0
