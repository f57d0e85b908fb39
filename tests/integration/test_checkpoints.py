"""Checkpoints: strict loads, stage-1 reuse across resamplers, hostile files, resume after SIGKILL, no-op re-runs,
non-finite losses, and the measurements record."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import panobench.training.runner as runner
from panobench.config import dump_run_config
from panobench.errors import CheckpointError, TrainingError
from panobench.models.checkpoint import load_checkpoint_file, load_stage_checkpoint
from panobench.stages import component_of
from panobench.training.builder import build_stage
from panobench.training.runner import train_stage
from panobench.training.system import PanoVLMSystem
from panobench.utils.io import read_json

HERE = Path(__file__).parent


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ------------------------------------------------------------------------------------------------ strict loading
@pytest.mark.parametrize("resampler", [{"type": "mlp", "params": {"pool_factor": 1}}, {"type": "qformer"}])
def test_checkpoint_of_another_resampler_config_is_refused(trained_cell, cfg_factory, resampler):
    system = build_stage(cfg_factory(resampler=resampler), "resampler").system
    with pytest.raises(CheckpointError, match="different model config.*resampler"):
        load_stage_checkpoint(system.model, system.cfg, system.stage, trained_cell.resampler_dir / "best.ckpt")


def test_checkpoint_of_the_same_config_loads_exactly(trained_cell, cfg_factory):
    system = build_stage(cfg_factory(), "resampler").system
    saved = _weights(trained_cell.resampler_dir / "best.ckpt")
    assert any(not torch.equal(system.state_dict()[k], v) for k, v in saved.items())   # fresh init differs
    meta = load_stage_checkpoint(system.model, system.cfg, system.stage, trained_cell.resampler_dir / "best.ckpt")
    assert meta["stage"] == "resampler"
    state = system.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert {component_of(k) for k in saved} == {"resampler", "projector", "pe"}


def test_vision_checkpoint_initialises_only_the_vision_tower_by_default(trained_cell, cfg_factory):
    """Symmetric starts: a stage-1 checkpoint starts every arm's vision tower, and no arm's resampler, even the arm
    whose type and size match the recipe's resampler."""
    vision_ckpt = trained_cell.vision_dir / "best.ckpt"
    saved = _weights(vision_ckpt)
    assert any(component_of(k) == "resampler" for k in saved)          # the recipe did train an mlp resampler
    for resampler in (None, {"type": "qformer"}, {"type": "mlp", "params": {"pool_factor": 1}}):
        built = build_stage(cfg_factory(**({"resampler": resampler} if resampler else {})), "resampler",
                            vision_checkpoint=str(vision_ckpt))
        assert built.resampler_init == "fresh"
        state = built.system.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items() if component_of(k) == "vision")
        if resampler is None:   # same type and size: still not loaded
            assert all(not torch.equal(state[k], v) for k, v in saved.items() if component_of(k) == "resampler")
    assert trained_cell.records["resampler"]["resampler_init"] == "fresh"
    assert read_json(trained_cell.resampler_dir / "checkpoint_metadata.json")["resampler_init"] == "fresh"


def test_reuse_resampler_is_an_explicit_opt_in_that_must_fit(trained_cell, cfg_factory):
    vision_ckpt = trained_cell.vision_dir / "best.ckpt"
    saved = _weights(vision_ckpt)
    same = build_stage(cfg_factory(vision={"reuse_resampler": True}), "resampler", vision_checkpoint=str(vision_ckpt))
    assert same.resampler_init == "loaded"
    state = same.system.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items() if component_of(k) in ("vision", "resampler"))
    for resampler in ({"type": "qformer"}, {"type": "mlp", "params": {"pool_factor": 1}}):
        with pytest.raises(CheckpointError, match="reuse_resampler"):
            build_stage(cfg_factory(resampler=resampler, vision={"reuse_resampler": True}), "resampler",
                        vision_checkpoint=str(vision_ckpt))
    cfg = cfg_factory(vision={"checkpoint": str(vision_ckpt), "reuse_resampler": True},
                      stages={"resampler": {"max_steps": 1, "val_every_n_steps": 1}}, runtime={"measure_flops": False})
    assert train_stage(cfg, "resampler")["resampler_init"] == "loaded"


class _Payload:
    """Unpickling this calls open(path, "w"): a file appears iff the payload ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_hostile_or_broken_files_are_refused(trained_cell, cfg_factory, tmp_path):
    good = (trained_cell.resampler_dir / "best.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 2])
    text = tmp_path / "text.ckpt"
    text.write_text("this is not a checkpoint\n")
    tensor_only = tmp_path / "tensor.ckpt"
    torch.save({"weights": torch.zeros(3)}, tensor_only)
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "panobench": {"stage": "resampler"}, "x": _Payload(marker)}, evil)
    assert not marker.exists()

    system = build_stage(cfg_factory(), "resampler").system
    for path, why in ((truncated, "not a readable"), (text, "not a readable"), (tensor_only, "not a panobench"),
                      (evil, "not a readable"), (tmp_path / "missing.ckpt", "not found")):
        with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*" + why if why != "not found" else why):
            load_stage_checkpoint(system.model, system.cfg, system.stage, path)
        with pytest.raises(CheckpointError):
            build_stage(cfg_factory(), "resampler", vision_checkpoint=str(path))
        with pytest.raises(CheckpointError):
            load_checkpoint_file(path)
    assert not marker.exists()
    # Control: the payload is real — an unsafe load would have run it.
    torch.load(evil, weights_only=False)
    assert marker.exists()


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_matches_an_uninterrupted_run(cfg_factory, tmp_path):
    """6 steps with a real SIGKILL after step 3 began (last.ckpt at step 2) + resume == 6 steps in one go."""
    stage = {"max_steps": 6, "batch_size": 4, "val_every_n_steps": 2, "limit_val_batches": 1,
             "checkpoint_every_n_steps": 2, "lr": 1e-2}
    cfg = cfg_factory(stages={"resampler": stage}, runtime={"measure_flops": False})
    config = tmp_path / "cfg.yaml"
    dump_run_config(cfg, config)
    killed, full = tmp_path / "killed", tmp_path / "full"
    barrier = tmp_path / "barrier"
    env = {**os.environ, "PANOBENCH_TEST_PAUSE_AT_STEP": "3", "PANOBENCH_TEST_BARRIER": str(barrier),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, str(HERE / "killable_train.py"), "train", "--config", str(config),
                             "--stage", "resampler", "--run-dir", str(killed)], env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while not barrier.exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the training subprocess never reached step 3"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "measurements.json").exists()
    assert torch.load(killed / "last.ckpt", weights_only=True)["global_step"] == 2

    resumed = train_stage(cfg, "resampler", run_dir=str(killed))
    uninterrupted = train_stage(cfg, "resampler", run_dir=str(full))
    assert resumed["steps"] == uninterrupted["steps"] == 6
    for name in ("last.ckpt", "best.ckpt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (killed, full))
        assert a["global_step"] == b["global_step"]
        assert a["state_dict"].keys() == b["state_dict"].keys() and a["state_dict"]
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (name, key)
    # Training moved the weights away from where the kill left them (the comparison is not vacuous).
    assert resumed["loss"]["last"] == uninterrupted["loss"]["last"]


# ------------------------------------------------------------------------------------------------ run directory
def test_rerunning_a_finished_stage_is_a_no_op(trained_cell, monkeypatch):
    run_dir = trained_cell.resampler_dir
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()}

    def no_build(*args, **kwargs):
        raise AssertionError("a finished stage was rebuilt")

    monkeypatch.setattr(runner, "build_stage", no_build)
    record = train_stage(trained_cell.cfg, "resampler")
    assert record == read_json(run_dir / "measurements.json") == trained_cell.records["resampler"]
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir() if p.is_file()} == before


def test_run_dir_of_another_config_is_an_error(trained_cell, cfg_factory, tmp_path):
    other = cfg_factory(stages={"resampler": {"lr": 0.5}})
    with pytest.raises(CheckpointError, match="another config"):
        train_stage(other, "resampler", run_dir=str(trained_cell.resampler_dir))
    # An interrupted run (metadata, no measurements) is protected the same way.
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "checkpoint_metadata.json").write_text('{"config_hash": "0123456789abcdef"}')
    with pytest.raises(CheckpointError, match="another config"):
        train_stage(other, "resampler", run_dir=str(partial))


# ------------------------------------------------------------------------------------------------ failures
def test_non_finite_loss_stops_training_and_names_the_step(cfg_factory, monkeypatch, tmp_path):
    original = PanoVLMSystem.compute_loss

    def poisoned(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if self.training and self.global_step == 3 else loss

    monkeypatch.setattr(PanoVLMSystem, "compute_loss", poisoned)
    cfg = cfg_factory(stages={"resampler": {"max_steps": 6}}, runtime={"measure_flops": False})
    run_dir = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 3 of stage 'resampler'"):
        train_stage(cfg, "resampler", run_dir=str(run_dir))
    assert not (run_dir / "measurements.json").exists()
    assert torch.load(run_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    assert torch.load(run_dir / "best.ckpt", weights_only=True)["global_step"] <= 2
    assert not [p for p in run_dir.iterdir() if p.suffix == ".ckpt" and p.name not in ("last.ckpt", "best.ckpt")]


# ------------------------------------------------------------------------------------------------ records
def test_measurements_record_has_every_field(trained_cell):
    rec = trained_cell.records["resampler"]
    assert rec == read_json(trained_cell.resampler_dir / "measurements.json")
    assert rec["cell_id"] == "c" and rec["stage"] == "resampler" and rec["status"] == "completed"
    assert re.fullmatch(r"[0-9a-f]{16}", rec["config_hash"])
    assert rec["knobs"] == {"overlap": 0.5, "fov": 90.0, "resampler": "mlp", "vision_checkpoint": "vis", "seed": 0}
    assert rec["geometry"] == {"num_tiles": 8, "num_views": 9, "nominal_overlap": 0.5, "effective_overlap": 0.5}
    tokens = rec["tokens"]
    assert tokens["vision_tokens_per_view"] == 64 and tokens["visual_tokens_per_sample"] == 9 * 16
    assert 5 < tokens["text_tokens_per_sample"] < 200
    speed = rec["speed"]
    assert speed["measured_steps"] == 3                            # 4 steps, 1 warm-up step excluded
    assert 0 < speed["step_time_median_s"] <= speed["step_time_p90_s"]
    assert speed["samples_per_s"] == pytest.approx(4 / speed["step_time_median_s"])
    assert speed["visual_tokens_per_s"] == pytest.approx(speed["samples_per_s"] * 144)
    assert speed["text_tokens_per_s"] > 0
    assert speed["tokens_per_s"] == pytest.approx(speed["visual_tokens_per_s"] + speed["text_tokens_per_s"])
    assert rec["memory"]["peak_gpu_allocated_gib"] is None and rec["memory"]["peak_gpu_reserved_gib"] is None
    assert 0.05 < rec["memory"]["peak_host_rss_gib"] < 64
    # Counted FLOPs: at least the frozen SigLIP forward over 4 samples x 9 views x 64 patches (2 FLOPs/param/token).
    vision_params = rec["params"]["by_component"]["vision"][1]
    assert rec["cost"]["flops_per_step"] > 2 * vision_params * 4 * 9 * 64
    assert rec["cost"]["device_peak_flops"] is None and rec["cost"]["mfu"] is None
    assert rec["kernel_path"] == "torch" and rec["resampler_init"] == "fresh"
    assert all(math.isfinite(rec["loss"][k]) for k in ("first", "last", "best_val", "last_val"))
    assert rec["loss"]["best_val"] <= rec["loss"]["last_val"]
    assert rec["gradient_check"]["step"] == 0
    assert set(rec["gradient_check"]["grad_norm_by_component"]) == {"resampler", "projector", "pe"}
    assert all(n > 0 for n in rec["gradient_check"]["grad_norm_by_component"].values())
    assert re.fullmatch(r"[0-9a-f]{64}", rec["data"]["fingerprint"]) and rec["data"]["num_images"] > 0
    assert rec["env"]["versions"]["python_executable"] == sys.executable
    env = rec["env"]
    assert env["device_type"] == "cpu" and env["device"] and env["hostname"]
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"]
    assert "git_revision" in env
    for stage in ("vision", "finetune"):
        other = trained_cell.records[stage]
        assert other["status"] == "completed" and other["cost"]["flops_per_step"] > 0
        assert other["speed"]["step_time_median_s"] > 0
    assert trained_cell.records["vision"]["vicreg_pairs"] > 0
    assert trained_cell.records["vision"]["tokens"]["visual_tokens_per_sample"] == 9 * 64
    assert (trained_cell.finetune_dir / "lora_weights" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["resampler", "finetune"])
def test_best_val_is_the_minimum_validation_loss_and_names_the_scored_checkpoint(trained_cell, stage):
    """loss.best_val is the best (not the last) validation loss, and best.ckpt is the checkpoint saved at its step."""
    run_dir = {"resampler": trained_cell.resampler_dir, "finetune": trained_cell.finetune_dir}[stage]
    rec = trained_cell.records[stage]
    logged = [line.split(",") for line in (run_dir / "logs" / "metrics.csv").read_text().splitlines()]
    header, rows = logged[0], logged[1:]
    col, step_col = header.index("val/loss"), header.index("step")
    vals = [(float(r[col]), int(r[step_col])) for r in rows if r[col]]
    assert len(vals) == {"resampler": 2, "finetune": 1}[stage]   # 4 (2) steps, validation every 2
    best_loss, best_step = min(vals)
    assert rec["loss"]["best_val"] == pytest.approx(best_loss)
    assert rec["loss"]["last_val"] == pytest.approx(vals[-1][0])
    # Lightning logs validation at the step count it ran after; best.ckpt stores the step it was saved at.
    assert rec["loss"]["best_val_step"] == load_checkpoint_file(run_dir / "best.ckpt")["global_step"]
    assert rec["loss"]["best_val_step"] in {s for _, s in vals} | {s + 1 for _, s in vals}


def test_a_trainable_component_without_gradient_stops_the_first_step(cfg_factory, monkeypatch):
    """The gradient-flow check: a resampler cut out of the graph (detached output) is named and stops the job,
    although ``requires_grad`` says it trains and the loss still goes down through the projector and PE."""
    from panobench.models.resamplers.mlp import MLPResampler

    original = MLPResampler.forward

    def detached(self, vision_tokens):
        return original(self, vision_tokens).detach()

    monkeypatch.setattr(MLPResampler, "forward", detached)
    cfg = cfg_factory(stages={"resampler": {"max_steps": 1, "val_every_n_steps": 1}}, runtime={"measure_flops": False})
    with pytest.raises(TrainingError, match=r"gradient-flow check failed: trainable component\(s\) with no non-zero "
                                            r"finite gradient: resampler \(e\.g\. \['model\.resampler\."):
        train_stage(cfg, "resampler")
    assert not (Path(cfg.runs_dir) / cfg.name / cfg.cell_id / "resampler" / "anyres-e2p_mlp" / "measurements.json").exists()


def test_bimamba_records_its_kernel_path(cfg_factory):
    model = build_stage(cfg_factory(resampler={"type": "bimamba"}), "resampler").system.model
    assert model.describe()["kernel_path"] == "reference"


def test_finetune_refuses_a_stage2_checkpoint_from_another_vision_encoder(trained_cell, cfg_factory):
    """Stage-2 checkpoints carry no vision weights, so stage 3 must name the same stage-1 checkpoint."""
    meta = torch.load(trained_cell.resampler_dir / "best.ckpt", weights_only=True)["panobench"]
    assert meta["vision_checkpoint"] == str((trained_cell.vision_dir / "best.ckpt").resolve())
    with pytest.raises(CheckpointError, match="vision checkpoint"):
        build_stage(cfg_factory(), "finetune", previous_stage_checkpoint=str(trained_cell.resampler_dir / "best.ckpt"))
