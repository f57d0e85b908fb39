"""Numerics: a non-finite loss stops training at that step, names it, and nothing is checkpointed after it."""

from __future__ import annotations

import re

import torch
import yaml
from reliability_helpers import CELL_A

from panobench.cli import main


def test_non_finite_loss_stops_the_cli_at_that_step(reference_run, tmp_path, monkeypatch, capsys):
    """Guarantee: ``panobench train`` with an absurd learning rate (1e30) stops with exit 2 and one error line naming
    the step at which the loss became non-finite; no measurements.json is written and last.ckpt (if any) is from a
    step no later than that one."""
    monkeypatch.chdir(reference_run.workdir)
    cfg = yaml.safe_load((reference_run.workdir / f"results/small/configs/{CELL_A}.yaml").read_text())
    cfg["stages"]["resampler"].update(lr=1.0e30, max_steps=6, val_every_n_steps=6, checkpoint_every_n_steps=1)
    path = tmp_path / "absurd.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--config", str(path), "--stage", "resampler", "--run-dir", str(run_dir)]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("panobench ")]
    assert len(lines) == 1 and lines[0].startswith("panobench train: error: non-finite loss"), lines
    step = int(re.search(r"at step (\d+)", lines[0]).group(1))
    assert 1 <= step < 6
    assert not (run_dir / "measurements.json").exists()
    assert not (run_dir / "best.ckpt").exists()
    if (run_dir / "last.ckpt").exists():
        assert torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] <= step
