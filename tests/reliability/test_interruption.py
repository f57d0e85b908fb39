"""Interruption: a hard kill (SIGKILL, no clean-up) at any point loses no work and corrupts no record.

The interrupted workflow (conftest.interrupted_run) is killed in stage 2, in ``generate`` and in ``score`` and re-run
with ``--rerun-incomplete`` each time; the reference workflow (conftest.reference_run) ran the same config in one go.
"""

from __future__ import annotations

import csv
import io
import json

import torch
from reliability_helpers import KILLED_CELL, RECIPE, eval_dir, stage_dir

STAGES = (("vision", RECIPE), ("resampler", KILLED_CELL), ("finetune", KILLED_CELL))


def _state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert set(a) == set(b), f"{what}: key sets differ"
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, f"{what}: {len(differing)} tensors differ, e.g. {differing[:3]}"


def _metric_values(path) -> dict[str, float | None]:
    return json.loads(path.read_text())["metrics"]


def test_stage2_sigkill_resumes_from_last_ckpt(interrupted_run):
    """Guarantee: a training job SIGKILLed mid-stage-2 (after a last.ckpt) resumes from that last.ckpt on
    ``snakemake --rerun-incomplete`` instead of starting over."""
    kill = interrupted_run.kills[0]
    assert kill["phase"] == "train_resampler"
    assert "last.ckpt" in kill["files"] and "measurements.json" not in kill["files"]
    assert 1 <= kill["stage2_last_step"] < 6, kill   # killed strictly inside the 6-step run
    log = (interrupted_run.workdir / "logs" / "small" / "train_resampler" / KILLED_CELL /
           "anyres-e2p_mlp.log").read_text()
    assert "resuming stage resampler from" in log
    record = json.loads((stage_dir(interrupted_run.workdir, KILLED_CELL, "resampler") / "measurements.json")
                        .read_text())
    assert record["steps"] == 6


def test_resumed_run_equals_uninterrupted_run(interrupted_run, reference_run):
    """Guarantee: after SIGKILL + resume, every stage's final weights (best.ckpt and last.ckpt tensors) and the
    cell's metrics.json metric values equal those of an uninterrupted run (CPU, same seed)."""
    for stage, experiment in STAGES:
        for name in ("best.ckpt", "last.ckpt"):
            got = _state(stage_dir(interrupted_run.workdir, experiment, stage) / name)
            want = _state(stage_dir(reference_run.workdir, experiment, stage) / name)
            _assert_same_tensors(got, want, f"{experiment}/{stage}/{name}")
    got = _metric_values(eval_dir(interrupted_run.workdir, KILLED_CELL) / "metrics.json")
    want = _metric_values(eval_dir(reference_run.workdir, KILLED_CELL) / "metrics.json")
    assert got == want
    pred = (eval_dir(interrupted_run.workdir, KILLED_CELL) / "predictions.csv").read_text()
    assert pred == (eval_dir(reference_run.workdir, KILLED_CELL) / "predictions.csv").read_text()


def _complete_predictions(blob: bytes) -> bool:
    rows = list(csv.DictReader(io.StringIO(blob.decode("utf-8"))))
    return len(rows) > 0 and all(r["references"].startswith("[") and r["references"].endswith("]") for r in rows)


def test_eval_sigkill_leaves_no_truncated_outputs(interrupted_run, reference_run):
    """Guarantee: a SIGKILL during ``generate`` or ``score`` leaves predictions.csv/metrics.json either absent or
    complete (atomic writes), and the re-run completes with the uninterrupted run's results."""
    phases = [k["phase"] for k in interrupted_run.kills]
    assert phases[1:] == ["generate", "score"]
    reference = eval_dir(reference_run.workdir, KILLED_CELL)
    for kill in interrupted_run.kills[1:]:
        files = kill["eval_files"]
        if "predictions.csv" in files:
            assert files["predictions.csv"] == (reference / "predictions.csv").read_bytes()
            assert _complete_predictions(files["predictions.csv"])
        if "metrics.json" in files:
            json.loads(files["metrics.json"])  # complete JSON
        # only the atomic writers' hidden temp files may be left behind, never a visible partial file
        visible = {n for n in files if not n.startswith(".")}
        assert visible <= {"predictions.csv", "generation.json", "metrics.json"}
    assert "metrics.json" not in interrupted_run.kills[2]["eval_files"]   # killed before score finished
    assert "predictions.csv" not in interrupted_run.kills[1]["eval_files"]
    assert (eval_dir(interrupted_run.workdir, KILLED_CELL) / "metrics.json").is_file()
