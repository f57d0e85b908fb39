"""The workflow's DAG, config validation, lint and profiles — all without running a job."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings, StorageSettings
from workflow_helpers import REPO, copy_workflow, run_snakemake


def job_counts(workdir: Path, configfiles: list[Path] | None = None) -> collections.Counter:
    """Job count per rule of a dry run, through the Snakemake Python API."""
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=configfiles or []),
                          storage_settings=StorageSettings(), snakefile=workdir / "Snakefile", workdir=workdir)
        dag_api = wf.dag(DAGSettings(forceall=True))
        dag_api.execute_workflow(executor="dryrun")
        return collections.Counter(job.rule.name for job in dag_api.workflow_api._workflow.dag.jobs)


def write_config(workdir: Path, name: str, data: dict) -> Path:
    path = workdir / "config" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_dag_matches_matrix_arithmetic(workflow_dir: Path) -> None:
    """Default matrix: 2 overlaps x 4 resamplers x 1 vision checkpoint x 2 seeds = 16 cells; stage 1 once."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    m = cfg["matrix"]
    cells = len(m["overlaps"]) * len(m["resamplers"]) * len(m["vision_checkpoints"]) * len(m["seeds"])
    recipes = sum("train" in v for v in m["vision_checkpoints"])
    counts = job_counts(workflow_dir)
    assert cells == 16 and recipes == 1
    assert counts == {
        "synth_data": 1, "materialize_models": 1, "fingerprint_data": 1, "plan_matrix": 1,
        "plot_tiles": len(m["overlaps"]), "train_vision": recipes,
        "train_resampler": cells, "train_finetune": cells,
        "generate": cells, "score": 1,
        "aggregate_results": 1, "build_report": 1, "all": 1,
    }


def test_recipe_shared_across_resamplers_is_trained_once(workflow_dir: Path) -> None:
    """Two recipes referenced by many cells: one train_vision job per recipe, however many cells use it."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["matrix"]["vision_checkpoints"] = [
        {"name": "pretrained"},
        {"name": "a", "train": {"overlap": 0.5, "resampler": "mlp"}},
        {"name": "b", "train": {"overlap": 0.25, "resampler": "bimamba", "seed": 1}},
    ]
    cfg["matrix"]["seeds"] = [0, 1]
    counts = job_counts(workflow_dir, [write_config(workflow_dir, "recipes", cfg)])
    cells = 2 * 4 * 3 * 2
    assert counts["train_vision"] == 2
    assert counts["train_resampler"] == counts["train_finetune"] == cells
    assert len(list((workflow_dir / "results/default/configs").glob("*.yaml"))) == cells + 2   # written at DAG build


def _dry_run_jobs(workdir: Path, configfile: Path) -> dict[str, set[str]]:
    """Rule -> the cells (or other wildcard values) of the jobs a plain dry run would run now."""
    proc = run_snakemake(workdir, "-n", "--cores", "1", "--configfile", str(configfile))
    jobs: dict[str, set[str]] = collections.defaultdict(set)
    rule = None
    for line in proc.stdout.splitlines() + [""]:
        if line.startswith("    ") and rule:
            if line.strip().startswith("wildcards: "):
                wildcards = line.strip().removeprefix("wildcards: ")
        elif rule:   # a job's block ends at the first line that is not indented
            jobs[rule].add(wildcards)
            rule = None
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule, wildcards = m[1], ""
    return dict(jobs)


def test_a_changed_cell_config_reruns_exactly_that_cell(workflow_dir: Path) -> None:
    """The resolved configs are written when the DAG is built, only where their content changed: after a finished run,
    changing one resampler's params re-runs exactly the cells of that resampler (and the matrix-wide manifest,
    aggregation and report), and leaves the other cells alone; an unchanged config re-runs nothing."""
    cfg = yaml.safe_load((workflow_dir / "config" / "small.yaml").read_text())
    cfg["matrix"]["overlaps"] = [0.0]
    cfg["matrix"]["resamplers"] = ["mlp", "qformer"]
    cfg["resampler_params"] = {"qformer": {"depth": 1, "num_heads": 4}}
    path = write_config(workflow_dir, "two-arms", cfg)
    # A finished run without running anything: create every output, then let `--touch` date them in DAG order.
    for jobs in dry_run_jobs(workflow_dir, path).values():
        for job in jobs:
            for out in job.output:
                target = workflow_dir / out
                if out.endswith("figures"):
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
    run_snakemake(workflow_dir, "--touch", "--cores", "1", "--configfile", str(path))
    assert _dry_run_jobs(workflow_dir, path) == {}, "precondition: everything up to date"

    time.sleep(0.05)   # a rewritten config must be newer than the outputs even on coarse-clock filesystems
    cfg["resampler_params"]["qformer"]["depth"] = 2
    write_config(workflow_dir, "two-arms", cfg)
    # Snakemake skips an input that is newer but has the checksum it recorded; without its records (.snakemake
    # removed, or files too big to checksum) the mtimes alone decide, so unchanged configs must keep theirs.
    metadata = workflow_dir / ".snakemake" / "metadata"
    for records in ("kept", "removed"):
        if records == "removed":
            shutil.rmtree(metadata)
        jobs = _dry_run_jobs(workflow_dir, path)
        qformer = {"cell=ov0.00_fov90_qformer_vis-pretrained_seed0, resampler=qformer"}
        assert jobs.pop("train_resampler") == jobs.pop("train_finetune") == qformer, records
        assert jobs.pop("generate") == {"cell=ov0.00_fov90_qformer_vis-pretrained_seed0"}, records
        assert set(jobs) == {"plan_matrix", "score", "aggregate_results", "build_report", "all"}, records


def test_large_matrix_dry_run_time(workflow_dir: Path) -> None:
    """A 96-cell matrix builds its DAG (the note reports the time; goal <= 5 s on an idle 2-core machine)."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg["matrix"]["overlaps"] = [0.0, 0.25, 0.5]
    cfg["matrix"]["seeds"] = [0, 1, 2, 3]
    cfg["matrix"]["vision_checkpoints"].insert(0, {"name": "pretrained"})
    path = write_config(workflow_dir, "big", cfg)
    start = time.perf_counter()
    counts = job_counts(workflow_dir, [path])
    elapsed = time.perf_counter() - start
    assert counts["train_finetune"] == 3 * 4 * 2 * 4 == 96
    print(f"96-cell dry run: {elapsed:.2f} s")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.update(bogus_key=1), "bogus_key"),
        (lambda c: c["matrix"].update(overlaps=[0.0, 1.0]), "1.0"),
        (lambda c: c["matrix"].update(overlaps=[-0.1]), "-0.1"),
        (lambda c: c["matrix"].update(resamplers=["mlp", "transformerx"]), "unknown resampler 'transformerx'"),
        (lambda c: c["matrix"].update(resamplers=["mlp; touch pwned"]), "mlp; touch pwned"),
        (lambda c: c["run"].update(bogus_run_key=3), "bogus_run_key"),
        (lambda c: c["run"]["geometry"].update(fov=180.0), "fov"),
        (lambda c: c["run"]["stages"]["resampler"].update(max_steps="ten"), "max_steps"),
    ],
    ids=["unknown-key", "overlap-1", "overlap-negative", "unknown-resampler", "shell-injection", "unknown-run-key",
         "fov-180", "wrong-type"],
)
def test_bad_config_is_a_clear_validation_error(workflow_dir: Path, mutate, message: str) -> None:
    """Schema + strict run-config checks fail the dry run with a message naming the key/value."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    mutate(cfg)
    path = write_config(workflow_dir, "bad", cfg)
    proc = run_snakemake(workflow_dir, "-n", "--cores", "1", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not list(workflow_dir.rglob("pwned"))


def test_lint_and_format(workflow_dir: Path) -> None:
    """`snakemake --lint` reports nothing and the rules are snakefmt-formatted."""
    proc = run_snakemake(workflow_dir, "--lint", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    fmt = subprocess.run([sys.executable, "-m", "snakefmt", "--check", "Snakefile", "rules/"], cwd=REPO,
                         capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_slurm_profile_builds_the_same_dag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SLURM profile parses and a dry run with it schedules exactly the local DAG's jobs."""
    local = copy_workflow(tmp_path / "local")
    remote = copy_workflow(tmp_path / "slurm")
    (remote / "profiles").mkdir()
    import shutil

    shutil.copytree(REPO / "profiles" / "slurm", remote / "profiles" / "slurm")

    # The profile deploys software with Apptainer; a dry run only checks that the binary answers `--version`.
    # No container engine exists here, so a stub stands in for it (nothing is executed in a dry run).
    stub = tmp_path / "bin" / "apptainer"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 'apptainer version 1.3.4'\n")
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")

    def jobs(workdir: Path, *extra: str) -> collections.Counter:
        proc = run_snakemake(workdir, "-n", "--cores", "1", *extra)
        stats = re.search(r"Job stats:\n(.*?)\n\s*total\s+(\d+)", proc.stdout + proc.stderr, re.S)
        assert stats, proc.stdout + proc.stderr
        return collections.Counter({m[0]: int(m[1]) for m in re.findall(r"^(\w+)\s+(\d+)$", stats.group(1), re.M)})

    assert jobs(local) == jobs(remote, "--profile", "profiles/slurm")


def test_full_scale_config_validates(workflow_dir: Path) -> None:
    """config/quic360.yaml passes the schema and strict run-config checks (its data is not here: DAG only)."""
    cfg = yaml.safe_load((REPO / "config" / "quic360.yaml").read_text())
    from panobench import matrix as pm

    exps = pm.experiments(cfg)
    cells = pm.expand_cells(cfg)
    assert len(cells) == 2 * 4 * 2 * 3 and len(exps) == len(cells) + 1
    assert all(e["vision"]["name_or_path"] == "google/siglip2-so400m-patch16-256" for e in exps.values())
    proc = run_snakemake(workflow_dir, "-n", "--cores", "1", "--configfile", "config/quic360.yaml", check=False)
    # The published CSVs are absent on CI machines: the dry run stops only there, at the rule that prepares the data.
    assert proc.returncode != 0
    assert "Missing input files for rule prepare_data" in proc.stdout + proc.stderr
    assert "data/quic360-published/train.csv" in proc.stdout + proc.stderr


def dry_run_jobs(workdir: Path, configfile: Path) -> dict[str, list]:
    """Rule name -> its jobs in a forced dry run (through the Snakemake Python API)."""
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[configfile]),
                          storage_settings=StorageSettings(), snakefile=workdir / "Snakefile", workdir=workdir)
        dag_api = wf.dag(DAGSettings(forceall=True))
        dag_api.execute_workflow(executor="dryrun")
        jobs: dict[str, list] = collections.defaultdict(list)
        for job in dag_api.workflow_api._workflow.dag.jobs:
            jobs[job.rule.name].append(job)
        return jobs


@pytest.mark.parametrize("published", ["local", "url"])
def test_source_block_prepares_the_run_data_before_any_job(workflow_dir: Path, published: str) -> None:
    """config/quic360.yaml's source: block -> one prepare_data job that writes run.data's CSVs (and the manifest),
    reading the published CSVs when they are local files; every training/eval job then depends on it."""
    cfg = yaml.safe_load((REPO / "config" / "quic360.yaml").read_text())
    if published == "local":
        for split in ("train", "valid", "test"):
            path = workflow_dir / cfg["source"][split]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("url,query,annotation\n")
    else:
        cfg["source"].update({s: f"https://example.org/quic360/{s}.csv" for s in ("train", "valid", "test")})
    jobs = dry_run_jobs(workflow_dir, write_config(workflow_dir, "quic360-source", cfg))
    (prepare,) = jobs["prepare_data"]
    data = cfg["run"]["data"]
    assert list(prepare.output) == [data["train_csv"], data["valid_csv"], data["test_csv"],
                                    f"{data['root']}/manifest.json", f"{data['root']}/dropped.csv"]
    assert list(prepare.input) == ([cfg["source"][s] for s in ("train", "valid", "test")] if published == "local"
                                   else [])
    assert list(prepare.params.published) == [cfg["source"][s] for s in ("train", "valid", "test")]
    assert list(prepare.params.options) == ["--on-missing", "fail", "--min-width", "1024", "--min-height", "512",
                                            "--workers", "16"]
    assert len(jobs["generate"]) == 48 and len(jobs["train_resampler"]) == 48


def test_source_block_needs_run_data_under_its_root(workflow_dir: Path) -> None:
    """run.data CSVs that are not <root>/<split>.csv would not be what prepare_data wrote: the DAG build fails."""
    cfg = yaml.safe_load((REPO / "config" / "quic360.yaml").read_text())
    cfg["run"]["data"]["train_csv"] = "data/elsewhere/train.csv"
    path = write_config(workflow_dir, "quic360-mismatch", cfg)
    proc = run_snakemake(workflow_dir, "-n", "--cores", "1", "--configfile", str(path), check=False)
    assert proc.returncode != 0
    assert "run.data.train_csv is 'data/elsewhere/train.csv'" in proc.stdout + proc.stderr
