"""Session fixture for tests/container: the CI image (rootfs_builder), built once per recipe and cached.

A machine without the tools fails these tests with the command that installs them; they never skip, so CI cannot
pass without having built and run the image.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from rootfs_builder import BuildError, Image, cached_image


@pytest.fixture(scope="session")
def container_image(request: pytest.FixtureRequest) -> Iterator[Image]:
    missing = [tool for tool in ("debootstrap", "bwrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"the container test needs {' and '.join(missing)} on PATH: apt-get install -y debootstrap "
                    "bubblewrap (.ci/run does), or deselect it with -m 'not container'", pytrace=False)
    if os.geteuid() != 0:
        pytest.fail("the container test runs debootstrap and bubblewrap mounts as root; run it as root, or deselect "
                    "it with -m 'not container'", pytrace=False)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    try:
        with cached_image() as image:
            phases = ", ".join(f"{name} {s:.0f} s" for name, s in image.record["phases_s"].items())
            how = f"built in {image.wait_s:.0f} s ({phases})" if image.built_now else (
                f"cached (built earlier in {image.record['build_s']:.0f} s: {phases})")
            if reporter is not None and capture is not None:  # the CI log shows whether this run paid for a build
                with capture.global_and_fixture_disabled():
                    reporter.write_line(f"\ncontainer image {image.path}: {how}; build log {image.log}")
            yield image
    except BuildError as err:
        pytest.fail(f"building the CI image failed: {err}", pytrace=False)
