"""Smoke test: a tiny Snakemake workflow runs through sbatch on the one-node test cluster.

The workflow mimics ours: a CPU rule, a GPU rule (``train_vision`` declares gpu=1, a large mem_mb
and 8 threads, as the real training rules do) and a second CPU rule; profiles/slurm-ci must turn it
into jobs the CPU-only node can run. Each rule writes the ``$SLURM_JOB_ID`` it ran under, so the
test can tie every output to a job that slurmctld recorded.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from slurm_testcluster import REPO_ROOT, SlurmCluster, failure_message, run_on_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.workflow, pytest.mark.slow]

RUN_TIMEOUT_S = 300  # run_on_cluster kills the process group: the slurm plugin ignores SIGTERM while polling

SNAKEFILE = r"""
rule all:
    input:
        "results/train_vision.txt",
        "results/summarize.txt",


rule synth_data:
    output:
        "results/synth_data.txt",
    shell:
        "echo \"job=$SLURM_JOB_ID\" > {output}"


rule train_vision:
    input:
        "results/synth_data.txt",
    output:
        "results/train_vision.txt",
    threads: 8
    resources:
        gpu=1,
        mem_mb=64000,
        runtime=240,
    shell:
        "echo \"job=$SLURM_JOB_ID gpus=${{SLURM_GPUS:-none}} cpus=$SLURM_CPUS_PER_TASK\" > {output}"


rule summarize:
    input:
        "results/synth_data.txt",
    output:
        "results/summarize.txt",
    shell:
        "echo \"job=$SLURM_JOB_ID\" > {output}"
"""

# "Job 1 has been submitted with SLURM jobid 3 (log: .../rule_train_vision/3.log)."; a rule that profiles/slurm-ci
# puts in a group (synth_data) logs to .../group_prepare_synth_data/<jobid>.log.
SUBMITTED = re.compile(r"/(?:rule|group_[a-z]+)_(\w+)/(\d+)\.log")


def _scontrol_job(cluster: SlurmCluster, job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as {Key: value}; MinJobAge=300 keeps finished jobs listed."""
    out = cluster.run("scontrol", "show", "job", "-o", job_id)
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def test_workflow_runs_every_job_through_sbatch(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    (tmp_path / "Snakefile").write_text(SNAKEFILE)
    profile = REPO_ROOT / "profiles" / "slurm-ci"
    run = run_on_cluster(
        slurm_cluster, ["snakemake", "--profile", str(profile)], tmp_path, slurm_cluster.env, RUN_TIMEOUT_S
    )
    log = run.log
    print(f"snakemake --profile profiles/slurm-ci wall time: {run.wall_s:.1f} s")  # shown with pytest -s
    assert run.returncode == 0 and not run.problem, failure_message(slurm_cluster, run)

    # Every job except the target rule was submitted with sbatch, once.
    submitted = {
        rule: job_id
        for line in log.splitlines()
        if "submitted with SLURM jobid" in line
        for rule, job_id in SUBMITTED.findall(line)
    }
    assert sorted(submitted) == ["summarize", "synth_data", "train_vision"], log[-6000:]
    assert len(set(submitted.values())) == 3

    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    for rule, job_id in submitted.items():
        # The output was written inside the very SLURM job snakemake submitted for that rule.
        first_line = (tmp_path / "results" / f"{rule}.txt").read_text().split()
        assert first_line[0] == f"job={job_id}", (rule, first_line)
        job = _scontrol_job(slurm_cluster, job_id)
        assert job["JobState"] == "COMPLETED", (rule, job)
        assert job["JobName"] == run_id  # the plugin names jobs by run id: these are this run's jobs
        assert Path(job["WorkDir"]) == tmp_path

    # The GPU rule ran on the CPU-only node because the CI profile strips its GPU request,
    # shrinks its memory and caps its threads (else sbatch rejects it or it pends forever).
    vision = _scontrol_job(slurm_cluster, submitted["train_vision"])
    assert "gpu" not in vision["TRES"], vision["TRES"]
    assert "mem=2000M" in vision["TRES"], vision["TRES"]
    assert (tmp_path / "results" / "train_vision.txt").read_text().split()[1:] == ["gpus=none", "cpus=1"]
