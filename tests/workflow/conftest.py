"""Fixtures for workflow tests (helpers live in ``workflow_helpers``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from workflow_helpers import copy_workflow


@pytest.fixture
def workflow_dir(tmp_path: Path) -> Path:
    return copy_workflow(tmp_path / "wf")
