"""Suite-wide collection: how ``pytest -n auto --dist loadgroup`` (pyproject's addopts) shares the work.

Each xdist worker builds its own session fixtures, so tests that share one (the SLURM test cluster, the container
image, the integration and reliability set-ups, the embedded default's run) must stay on one worker: they get one
``xdist_group`` per directory or module. tests/cluster and tests/container are one group: both compare a run with
the same local reference run of small.yaml (``small_local_run`` below), made once. The slow workflow tests that share nothing (the GPU sessions' CPU modes)
are groups of their own, so the two workers can run them side by side.

Groups are handed out in collection order, so the longest ones go first: a worker that starts the embedded
default late would leave the other idle at the end. The container build waits mostly on downloads, the SLURM run on
status polls: beside a CPU-bound group they cost little.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Directories whose tests share session fixtures (conftest.py / helpers there) -> their group. cluster and container
# share `small_local_run`.
SHARED_DIRECTORIES = {"cluster": "cluster+container", "container": "cluster+container",
                      "integration": "integration", "reliability": "reliability"}
# Modules whose slow tests share nothing: one group per test.
INDEPENDENT_MODULES = ("workflow/test_gpu_speed_config.py",)
# Longest first (seconds on a 2-core CI machine, from `--durations`); everything else keeps its place after these.
LONGEST_FIRST = (
    "workflow/test_embedded_default.py",          # the default matrix, ~8 min
    "cluster+container",                          # a cold root filesystem build (~5 min), small.yaml locally, in
                                                  # the image and through SLURM (polls), the SLURM smoke test
    "workflow/test_gpu_speed_config.py::test_ddp_session_cpu_mode",
    "workflow/test_gpu_speed_config.py::test_single_gpu_session_cpu_mode",
    "reliability",
    "workflow/test_gpu_speed_config.py::test_smoke_variant_runs_through_the_workflow",
    "integration",
)


def xdist_group_of(item: pytest.Item) -> str:
    """The group ``item`` runs in: its directory, its module, or (independent slow tests) itself."""
    rel = Path(item.path).resolve().relative_to(TESTS).as_posix()
    top = rel.split("/", 1)[0]
    if top in SHARED_DIRECTORIES:
        return SHARED_DIRECTORIES[top]
    if rel in INDEPENDENT_MODULES and item.get_closest_marker("slow"):
        return f"{rel}::{item.name}"
    return rel


def _rank(group: str) -> int:
    return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)


# tryfirst: xdist's worker reads the xdist_group marks in its own pytest_collection_modifyitems, which would
# otherwise run before this one (and see no marks: every test its own unit, session fixtures built per worker).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups = {}
    for item in items:
        groups[item.nodeid] = group = xdist_group_of(item)
        item.add_marker(pytest.mark.xdist_group(group))
    # Stable: within a rank, collection order (and so each module's own test order) is kept.
    items.sort(key=lambda item: _rank(groups[item.nodeid]))


# ------------------------------------------------------------------------------------------------ measured figures
# Under xdist a worker's prints never reach the terminal; a test hands what it measured (wall times, rates) to the
# `measured` fixture instead, and the run's summary lists it, so the CI log shows the figures.
MEASURED = "measured"


@pytest.fixture
def measured(record_property):
    """``measured(text)``: one line for the summary's "measured" section."""
    def note(text: str) -> None:
        record_property(MEASURED, text)
    return note


def pytest_terminal_summary(terminalreporter) -> None:
    lines = []
    for reports in terminalreporter.stats.values():
        for rep in reports:
            for name, value in getattr(rep, "user_properties", ()):
                line = f"{rep.nodeid}: {value}"
                if name == MEASURED and getattr(rep, "when", "call") == "call" and line not in lines:
                    lines.append(line)
    if lines:
        terminalreporter.section("measured")
        for line in lines:
            terminalreporter.line(line)


# ------------------------------------------------------------------------------------------------ shared runs
def _workflow_helpers():
    """tests/workflow/workflow_helpers.py (copy_workflow, run_snakemake) under a name of its own."""
    spec = importlib.util.spec_from_file_location("_panobench_workflow_helpers_shared",
                                                  TESTS / "workflow" / "workflow_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL_LOCAL_TIMEOUT_S = 1200


@dataclass
class BackgroundRun:
    """A workflow run started in a background thread: ``result()`` waits for it (and re-raises its failure, with
    its output and job logs) and returns its working directory."""

    workdir: Path
    future: Future

    def result(self) -> Path:
        self.future.result()
        return self.workdir


@pytest.fixture(scope="session")
def small_local_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundRun]:
    """``snakemake --cores 2 --configfile config/small.yaml`` in a scratch copy of the workflow, once per session:
    the local reference that tests/cluster (the SLURM run) and tests/container (the run in the image) compare with.

    It starts when first requested and runs while the requesting test runs its own side (the two cores are idle in
    each run's serial stretches); the tests call ``result()`` when they need it."""
    helpers = _workflow_helpers()
    workdir = helpers.copy_workflow(tmp_path_factory.mktemp("small-local") / "wf")
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(helpers.run_snakemake, workdir, "--cores", "2", "--configfile", "config/small.yaml",
                             timeout=SMALL_LOCAL_TIMEOUT_S)
        yield BackgroundRun(workdir, future)
