"""The small experiment matrix runs through sbatch on the one-node test cluster and reports what a local run reports.

Two scratch copies of the workflow run ``config/small.yaml`` (2 cells: overlap 0.0 and 0.5, stage 2 -> stage 3 ->
generate -> score -> report): one with ``--profile profiles/slurm-ci``, one locally with ``--cores 2`` (the session's
``small_local_run``, tests/conftest.py: tests/container compares its container run with the same one). The test
ties every GPU-rule job (train_resampler, train_finetune, generate) of every cell to a COMPLETED SLURM job that
slurmctld recorded for this run, prints the job table (shown in CI output), and checks that both reports agree on
everything except what legitimately varies between runs (timings, memory, process ids).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import pytest
from slurm_testcluster import REPO_ROOT, SlurmCluster, failure_message, run_on_cluster

from panobench.reporting.aggregate import RUN_MEASUREMENT_COLUMNS

pytestmark = [pytest.mark.cluster, pytest.mark.workflow, pytest.mark.slow]

# Observed 306 s on a quiet 2-core machine, 8.4 min with other test runs loading it (15 min before
# profiles/slurm-ci grouped its CPU rules). run_on_cluster stops it early if the queue is stuck.
SLURM_TIMEOUT_S = 1000
GPU_RULES = ("train_resampler", "train_finetune", "generate")
# Columns that measure the run rather than the experiment (speed, memory, the host): measured (non-null) in exactly
# the same rows in both runs, but their values may differ.
VOLATILE_COLUMNS = RUN_MEASUREMENT_COLUMNS
# Must survive the column filter: a comparison that silently dropped these would prove nothing.
REQUIRED_COMPARED = (
    "cell_id",
    "overlap",
    "resampler",
    "seed",
    "stage",
    "status",
    "num_views",
    "visual_tokens_per_sample",
    "text_tokens_per_sample",
    "params_trainable",
    "params_total",
    "flops_per_step",
    "loss_first",
    "loss_last",
    "loss_best_val",
    "Bleu_1",
    "Bleu_4",
    "METEOR",
    "ROUGE_L",
    "CIDEr",
    "baseline_CIDEr",
    "delta_CIDEr",
    "config_hash",
)
# "Job 7 has been submitted with SLURM jobid 12 (log: ...)": the plugin's line for every sbatch call.
SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)")


def _workflow_helpers():
    """tests/workflow/workflow_helpers.py (copy_workflow, snakemake_env, run_snakemake) under a name of its own."""
    spec = importlib.util.spec_from_file_location(
        "_panobench_workflow_helpers", REPO_ROOT / "tests/workflow/workflow_helpers.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


WF = _workflow_helpers()


def _scontrol_job(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as {Key: value}; slurm_up.sh's MinJobAge=3600 keeps finished jobs listed."""
    out = cluster.run("scontrol", "show", "job", "-o", job_id)
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _print_job_table(rows: list[tuple[str, str, str, str]], wall_s: float, path: Path, measured) -> None:
    lines = [
        f"SLURM jobs of `snakemake --profile profiles/slurm-ci --configfile config/small.yaml` ({wall_s:.0f} s):",
        f"{'jobid':>6}  {'state':<10} {'elapsed':>8}  comment (rule_<rule or group>[_wildcards_<values>])",
    ]
    lines += [f"{jid:>6}  {state:<10} {elapsed:>8}  {comment}" for jid, state, elapsed, comment in rows]
    text = "\n".join(lines)
    path.write_text(text + "\n")
    measured("\n" + text)  # the CI log must show which SLURM jobs ran


def test_small_matrix_runs_through_sbatch_and_matches_local(
    small_local_run, slurm_cluster: SlurmCluster, tmp_path: Path, measured
) -> None:
    # The same sub-matrix twice: locally (the reference report, tests/conftest.py's small_local_run, which
    # tests/container compares with too) and on the SLURM test cluster. The local run starts in the background
    # before the cluster (if no earlier test started it): the SLURM run spends most of its wall time waiting for
    # status polls, the local run fills those gaps.
    wf = WF.copy_workflow(tmp_path / "slurm")
    env = {**WF.snakemake_env(), "SLURM_CONF": slurm_cluster.env["SLURM_CONF"]}
    run = run_on_cluster(
        slurm_cluster,
        [sys.executable, "-m", "snakemake", "--profile", str(REPO_ROOT / "profiles" / "slurm-ci"),
         "--configfile", "config/small.yaml"],
        wf,
        env,
        SLURM_TIMEOUT_S,
    )
    local = small_local_run.result()   # re-raises the local run's failure, with its job logs
    wall_s, log = run.wall_s, run.log
    (tmp_path / "slurm_snakemake.log").write_text(log)
    assert run.returncode == 0 and not run.problem, failure_message(slurm_cluster, run, tail=8000)

    # --- every submitted job, as slurmctld recorded it ---
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    submitted = SUBMITTED.findall(log)
    assert submitted, log[-6000:]
    jobs = {jid: _scontrol_job(slurm_cluster, jid) for jid, _ in submitted}
    rows = [(jid, j["JobState"], j.get("RunTime", "?"), j.get("Comment", "")) for jid, j in jobs.items()]
    _print_job_table(rows, wall_s, tmp_path / "slurm_jobs.txt", measured)
    for jid, job in jobs.items():
        assert job["JobState"] == "COMPLETED", (jid, job)
        assert job["JobName"] == run_id, (jid, job["JobName"])  # the plugin names jobs by run id: this run's jobs
        assert Path(job["WorkDir"]) == wf

    # --- each GPU-rule job of each cell had a SLURM job of its own ---
    manifest = json.loads((wf / "results" / "small" / "manifest.json").read_text())
    cells = [c["cell_id"] for c in manifest["cells"]]
    assert len(cells) == 2, cells
    comments = [job.get("Comment", "") for job in jobs.values()]
    for cell in cells:
        for rule in GPU_RULES:
            # The plugin comments each job "rule_<rule>_wildcards_<wildcard values joined by _>".
            prefix = f"rule_{rule}_wildcards_{cell}"
            matching = [c for c in comments if c == prefix or c.startswith(prefix + "_")]
            assert len(matching) == 1, (
                f"{rule} for {cell}: SLURM jobs with comment {prefix!r}: {matching}; all: {comments}"
            )
    # Nothing ran outside SLURM: every job snakemake finished was in a submitted sbatch job or a group of them.
    finished_rules = set(re.findall(r"Finished jobid: \S+ \(Rule: (\w+)\)", log))
    assert set(GPU_RULES) <= finished_rules, finished_rules
    assert not re.search(r"^localrule (?!all:)", log, re.M), "a rule other than `all` ran on the submit host"

    # --- the two reports agree ---
    got = pd.read_csv(wf / "reports" / "small" / "results.csv")
    want = pd.read_csv(local / "reports" / "small" / "results.csv")
    assert (wf / "reports" / "small" / "report.html").stat().st_size > 0
    assert list(got.columns) == list(want.columns)
    key = ["cell_id", "stage"]
    got, want = got.sort_values(key).reset_index(drop=True), want.sort_values(key).reset_index(drop=True)
    assert len(got) == 2 * len(cells) and set(got["stage"]) == {"resampler", "finetune"}, got[key]
    assert (got["status"] == "ok").all(), got[[*key, "status", "error"]]
    compared = [c for c in got.columns if c not in VOLATILE_COLUMNS]
    assert set(REQUIRED_COMPARED) <= set(compared)
    diffs = [
        f"{got.at[i, 'cell_id']}/{got.at[i, 'stage']} {col}: slurm={got.at[i, col]!r} local={want.at[i, col]!r}"
        for col in compared
        for i in got.index
        if not _same(got.at[i, col], want.at[i, col])
    ]
    assert not diffs, "SLURM and local reports differ:\n" + "\n".join(diffs)
    for col in VOLATILE_COLUMNS:
        assert (got[col].isna() == want[col].isna()).all(), f"{col} measured in one run only: {got[col]} vs {want[col]}"
    # The generated captions themselves, not only their scores.
    for pred in sorted(local.glob("runs/small/*/eval/*/predictions.csv")):
        rel = pred.relative_to(local)
        assert (wf / rel).read_bytes() == pred.read_bytes(), f"{rel} differs between SLURM and local runs"
    assert len(list(local.glob("runs/small/*/eval/*/predictions.csv"))) >= 2 * len(cells)
