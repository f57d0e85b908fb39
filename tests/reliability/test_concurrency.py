"""Concurrency: cells that share a stage-1 recipe, run with ``--cores 2``, train it once and read it only when
complete."""

from __future__ import annotations

import csv
import re

from reliability_helpers import CELL_A, CELL_B, RECIPE, stage_dir

from panobench.utils.io import read_json


def test_shared_stage1_recipe_trains_once(reference_run):
    """Guarantee: two cells sharing one stage-1 recipe never train it twice (one train_vision job, one log, one
    benchmark row) and both cells start from that same checkpoint, which was complete (its measurements.json,
    written last, existed) before either cell's stage 2 began."""
    wd = reference_run.workdir
    assert len(re.findall(r"rule train_vision:", reference_run.stdout)) == 1, reference_run.stdout[-3000:]
    assert len(re.findall(r"rule train_resampler:", reference_run.stdout)) == 2
    logs = list((wd / "logs/small/train_vision").glob("*.log"))
    assert [p.name for p in logs] == [f"{RECIPE}_mlp.log"]
    bench = list((wd / "benchmarks/small/train_vision").glob("*.tsv"))
    assert len(bench) == 1 and len(list(csv.reader(bench[0].open(), delimiter="\t"))) == 2   # header + one run
    vision_ckpt = stage_dir(wd, RECIPE, "vision") / "best.ckpt"
    marker = stage_dir(wd, RECIPE, "vision") / "measurements.json"
    for cell in (CELL_A, CELL_B):
        meta = read_json(stage_dir(wd, cell, "resampler") / "checkpoint_metadata.json")
        assert (wd / meta["init_sources"]["vision_checkpoint"]).resolve() == vision_ckpt.resolve()
        started = (stage_dir(wd, cell, "resampler") / "checkpoint_metadata.json").stat().st_mtime
        assert marker.stat().st_mtime <= started


def test_atomic_checkpoint_io_replaces_the_file_whole(tmp_path, monkeypatch):
    """Guarantee (checkpoint writer, see docs/reliability.md: to be wired into the Trainer): AtomicCheckpointIO writes
    a temporary file beside the target and renames it, so a reader or a crash mid-write sees the old complete
    checkpoint or the new one, never half of one, whatever filesystem $TMPDIR is on."""
    import os

    import pytest
    import torch

    from panobench.training.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "run" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.zeros(4)}, target)

    renames: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda s, d: (renames.append((str(s), str(d))), real_replace(s, d))[1])
    io.save_checkpoint({"step": 2, "w": torch.ones(4)}, target)
    assert renames and renames[-1][1] == str(target) and os.path.dirname(renames[-1][0]) == str(target.parent)
    assert torch.load(target, weights_only=True)["step"] == 2

    # a crash half-way through writing the new checkpoint leaves the previous one intact (and no temp file)
    io.save_checkpoint({"step": 1, "w": torch.zeros(4)}, target)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError):
        io.save_checkpoint({"step": 3, "w": torch.ones(4)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
