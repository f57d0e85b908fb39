"""Static checks of the Snakemake profiles in profiles/: the installed snakemake must accept them as written."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import yaml
from snakemake.cli import get_argument_parser, get_profile_dir

REPO_ROOT = Path(__file__).resolve().parents[2]
PROFILES = REPO_ROOT / "profiles"
PROFILE_NAMES = ("local", "slurm", "slurm-ci")
# The workflow's GPU rules (they declare resources gpu=1); the slurm profiles must cover exactly these.
GPU_RULES = {"train_vision", "train_resampler", "train_finetune", "generate"}
KEY_LINE = re.compile(r"^\s*[\w-]+:")


def _load(name: str) -> dict:
    return yaml.safe_load((PROFILES / name / "config.yaml").read_text())


def _parse_with_snakemake(profile_dir: Path):
    """Parse a profile with snakemake's own CLI parser (plugins' --slurm-* options included).

    Raises:
        AssertionError: snakemake rejected the profile; the message carries its error output.
    """
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return get_argument_parser(profiles=[str(profile_dir)]).parse_args([])
    except SystemExit as exc:
        raise AssertionError(f"snakemake rejected {profile_dir}: {stderr.getvalue().strip()}") from exc


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_snakemake_finds_the_profile_file(name: str) -> None:
    # profile.yaml for Snakemake >= 9.19, config.yaml (the same bytes) for older versions, which read only that.
    # 9.x reads both with the same priority, so they must be identical, or which one is used would depend on
    # directory listing order.
    found_dir, found_file = get_profile_dir(str(PROFILES / name))
    assert found_dir == PROFILES / name
    assert found_file.name in {"config.yaml", "profile.yaml"}
    assert (PROFILES / name / "profile.yaml").read_bytes() == (PROFILES / name / "config.yaml").read_bytes()


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_profile_is_accepted_by_installed_snakemake(name: str) -> None:
    assert isinstance(_load(name), dict)
    _parse_with_snakemake(PROFILES / name)


def test_unknown_profile_key_is_rejected(tmp_path: Path) -> None:
    # Control for the test above: snakemake's parser does fail on a key it does not know.
    (tmp_path / "config.yaml").write_text("jobs: 2\nslurm-status-commmand: squeue\n")
    with pytest.raises(AssertionError, match="slurm-status-commmand"):
        _parse_with_snakemake(tmp_path)


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_every_entry_carries_a_comment(name: str) -> None:
    lines = (PROFILES / name / "config.yaml").read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        if not KEY_LINE.match(line) or " # " in line:
            continue
        previous = next((p.strip() for p in reversed(lines[:i]) if p.strip()), "")
        if not previous.startswith("#"):
            uncommented.append(line.strip())
    assert not uncommented, f"profiles/{name}/config.yaml entries without a comment: {uncommented}"


def test_slurm_profile_requests_gpus_for_exactly_the_gpu_rules() -> None:
    profile = _load("slurm")
    gpu_rules = {rule for rule, res in profile["set-resources"].items() if int(res.get("gpu", 0)) >= 1}
    assert gpu_rules == GPU_RULES
    assert "gpu" not in profile["default-resources"]
    for rule in GPU_RULES:
        # The plugin's GPU keys are gpu/gpu_model; a gres "gpu:N" as well would be rejected as a conflict.
        assert "gres" not in profile["set-resources"][rule]


def test_gpu_rule_list_matches_the_workflow() -> None:
    # The profiles name GPU rules explicitly; a renamed or added GPU rule must be added to them too.
    declared = set()
    for smk in sorted((REPO_ROOT / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", smk.read_text(), flags=re.M):
            rule = re.match(r"rule (\w+):", block)
            if rule and re.search(r"^\s+gpu\s*=\s*[1-9]", block, re.M):
                declared.add(rule[1])
    assert declared == GPU_RULES


def test_slurm_profile_runs_jobs_in_the_container_with_gpus() -> None:
    args = _parse_with_snakemake(PROFILES / "slurm")
    assert args.executor == "slurm"
    assert {m.name for m in args.software_deployment_method} == {"APPTAINER"}
    assert "--nv" in args.apptainer_args.split()
    assert args.retries >= 1  # preempted training jobs resubmit and resume from last.ckpt
    assert args.rerun_incomplete
    assert args.slurm_status_command in {"sacct", "squeue"}


def test_slurm_ci_profile_fits_a_cpu_only_node_without_slurmdbd() -> None:
    profile = _load("slurm-ci")
    args = _parse_with_snakemake(PROFILES / "slurm-ci")
    assert args.executor == "slurm"
    assert not args.software_deployment_method  # no apptainer on CI machines
    assert args.jobs == 2
    assert args.max_threads == 1
    # Without slurmdbd only squeue answers; squeue-based polling needs MinJobAge >= 3 x first check delay,
    # else the plugin silently goes back to sacct and waits forever.
    assert args.slurm_status_command == "squeue"
    min_job_age = int(re.search(r"^MinJobAge=(\d+)$", (REPO_ROOT / "tests/cluster/slurm_up.sh").read_text(), re.M)[1])
    assert 3 * args.slurm_init_seconds_before_status_checks < min_job_age
    # Every GPU rule is overridden to request no GPU (there is no gres on the test node).
    assert set(profile["set-resources"]) == GPU_RULES
    assert all(res["gpu"] == 0 for res in profile["set-resources"].values())
    assert "gpu" not in profile["default-resources"]


def test_local_profile_runs_on_this_machine() -> None:
    profile = _load("local")
    args = _parse_with_snakemake(PROFILES / "local")
    assert args.executor in (None, "local")
    assert profile["cores"] == "all"
    assert args.rerun_incomplete and not args.keep_going and args.printshellcmds
    assert not args.software_deployment_method
