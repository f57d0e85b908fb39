"""Every benchmark script still starts: a module moved or renamed in src/ must not break a script that only the
GPU sessions (or a person) run. ``--help`` imports the script's panobench modules and parses nothing else.

One interpreter starts them all, one after another, as ``python SCRIPT --help`` would (``runpy`` as ``__main__``,
the script's folder as ``sys.path[0]``, ``SystemExit`` caught): the third-party imports they share (torch,
transformers) are paid once instead of once per script. Every module loaded from this checkout (src/panobench,
benchmarks/, tests/) is dropped before the next script starts, so each script imports its panobench modules afresh
and cannot lean on what an earlier script loaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").rglob("*.py") if p.name != "__init__.py")

# Run by the one interpreter: argv[1] is a JSON list of scripts; prints one JSON object {script: [rc, out, err]}.
_STARTER = r"""
import contextlib, io, json, runpy, sys, traceback
from pathlib import Path

root = Path(sys.argv[2]).resolve()
results = {}
for script in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    sys.path[0] = str(Path(script).parent)   # `python -c` put the working directory there
    sys.argv = [script, "--help"]
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            rc = 1
    sys.path[:], sys.argv[:] = saved_path, saved_argv
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(root):
            del sys.modules[name]
    results[script] = [rc, out.getvalue(), err.getvalue()]
print("\n" + json.dumps(results))
"""


@pytest.fixture(scope="module")
def started() -> dict[str, list]:
    """{script: [exit code, stdout, stderr]} of ``SCRIPT --help``, every script started by one interpreter."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _STARTER, json.dumps([str(s) for s in SCRIPTS]),
                           str(ROOT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_there_are_benchmark_scripts():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_script_starts(script: Path, started: dict[str, list]):
    rc, stdout, stderr = started[str(script)]
    assert rc == 0, stderr[-3000:]
    assert "usage" in stdout.lower()
