"""Fixtures for the data-preparation tests: one loopback HTTP server and one small synthetic dataset per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback_http import LoopbackServer
from prepare_helpers import synthetic_dataset


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib honours *_proxy variables; the loopback server must be reached directly.
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    with LoopbackServer(max_requests=500) as srv:
        yield srv
        assert srv.overflow == 0, "the client sent more requests than any test needs (a retry loop?)"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict]:
    """64x32 synthetic ERPs: 6 train, 2 valid, 2 test images (test: 4-6 references per (image, query))."""
    return synthetic_dataset(Path(tmp_path_factory.mktemp("synthetic")) / "data", n_train=6, n_valid=2, n_test=2)
