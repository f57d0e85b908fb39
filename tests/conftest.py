"""Suite-wide collection: how ``pytest -n auto --dist loadgroup`` (pyproject's addopts) shares the work.

Each xdist worker builds its own session fixtures, so tests that share one (the SLURM test cluster, the container
image, the integration and reliability set-ups, the embedded default's run) must stay on one worker: they get one
``xdist_group`` per directory or module. The slow workflow tests that share nothing (the GPU sessions' CPU modes)
are groups of their own, so the two workers can run them side by side.

Groups are handed out in collection order, so the longest ones go first: a worker that starts the embedded
default late would leave the other idle at the end. The container build waits mostly on downloads, the SLURM run on
status polls: beside a CPU-bound group they cost little.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
# Directories whose tests share session fixtures (conftest.py / helpers there): one group each.
SHARED_DIRECTORIES = ("cluster", "container", "integration", "reliability")
# Modules whose slow tests share nothing: one group per test.
INDEPENDENT_MODULES = ("workflow/test_gpu_speed_config.py",)
# Longest first (seconds on a 2-core CI machine, from `--durations`); everything else keeps its place after these.
LONGEST_FIRST = (
    "workflow/test_embedded_default.py",          # the default matrix, ~8 min
    "container",                                  # a cold root filesystem build (~5 min) and two small runs
    "workflow/test_gpu_speed_config.py::test_ddp_session_cpu_mode",
    "workflow/test_gpu_speed_config.py::test_single_gpu_session_cpu_mode",
    "cluster",
    "reliability",
    "workflow/test_gpu_speed_config.py::test_smoke_variant_runs_through_the_workflow",
    "integration",
)


def xdist_group_of(item: pytest.Item) -> str:
    """The group ``item`` runs in: its directory, its module, or (independent slow tests) itself."""
    rel = Path(item.path).resolve().relative_to(TESTS).as_posix()
    top = rel.split("/", 1)[0]
    if top in SHARED_DIRECTORIES:
        return top
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
