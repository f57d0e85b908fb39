"""Fixtures of the reliability battery; they live in reliability_helpers.py so test modules can import helpers
from a uniquely named module (several test folders have a ``conftest`` module)."""

from reliability_helpers import interrupted_run, keep_going_run, reference_run  # noqa: F401
