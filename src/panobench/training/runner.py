"""Train one stage of one cell end to end: build, check, fit (resuming from last.ckpt), measure, record.

Completion marker: ``measurements.json`` is written last, atomically, keyed by the config hash. Re-running a
finished stage with the same config is a no-op; a run directory holding another config is an error (defect 3 of
the original code: a stale state file silently skipped stages).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import statistics
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from panobench.config import RunConfig, config_hash, config_to_dict, dump_run_config
from panobench.errors import CheckpointError, ConfigError
from panobench.measurement.flops import ModelFlops, count_model_flops, datasheet_peak_flops, mfu
from panobench.measurement.throughput import (
    measured_peak_flops,
    peak_gpu_memory_gib,
    peak_host_rss_gib,
    summarize_step_times,
)
from panobench.models.assembly import build_device, compile_blocks
from panobench.models.checkpoint import load_checkpoint_file, run_paths
from panobench.stages import get_stage, stage_dir
from panobench.training.builder import build_stage, stage_compiles
from panobench.training.callbacks import GradientFlowCheck, LossCurve, ThroughputCallback
from panobench.training.checkpoint_io import AtomicCheckpointIO
from panobench.training.datamodule import PanoDataModule
from panobench.utils.io import read_json, write_json_atomic
from panobench.utils.repro import device_description, git_revision, package_versions, seed_everything

logger = logging.getLogger(__name__)


def _accelerator(cfg: RunConfig) -> str:
    if cfg.runtime.accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.runtime.accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.accelerator is 'cuda' but no CUDA device is available")
    return cfg.runtime.accelerator


def _check_run_dir(run_dir: Path, cfg: RunConfig) -> bool:
    """True if the stage already completed with this config; error if the directory belongs to another config."""
    marker = run_dir / "measurements.json"
    meta_file = run_dir / "checkpoint_metadata.json"
    for f in (marker, meta_file):
        if f.exists():
            recorded = read_json(f).get("config_hash")
            if recorded != config_hash(cfg):
                raise CheckpointError(f"{run_dir} holds a run of another config (hash {recorded}, this config "
                                      f"{config_hash(cfg)}); remove the directory or give this run another name")
    return marker.exists()


def data_record(cfg: RunConfig, fingerprint_file: str | os.PathLike | None) -> dict[str, Any]:
    """The data fingerprint a job records: from the workflow's ``fingerprint_data`` output, else computed here."""
    if fingerprint_file is not None:
        return read_json(fingerprint_file)
    from panobench.data.fingerprint import dataset_fingerprint

    return dataset_fingerprint({"train": cfg.data.train_csv, "valid": cfg.data.valid_csv, "test": cfg.data.test_csv},
                               cfg.data.root)


def train_stage(cfg: RunConfig, stage: str, *, resume: str | None = None, run_dir: str | None = None,
                data_fingerprint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train ``stage`` of the cell described by ``cfg``; returns the measurements record.

    ``data_fingerprint``: the JSON written by ``panobench fingerprint`` for this config's data (computed here when
    not given); it is recorded in measurements.json so two runs can be told to have used the same data.
    """
    spec = get_stage(stage)
    out = Path(run_dir) if run_dir else stage_dir(cfg, stage)
    if _check_run_dir(out, cfg):
        logger.info("%s: stage %s already completed with config %s; nothing to do", out, stage, config_hash(cfg))
        return read_json(out / "measurements.json")
    if spec.objective == "vicreg" and cfg.geometry.overlap <= 0.0:
        raise ConfigError(f"stage {stage!r} learns from overlapping tiles; geometry.overlap={cfg.geometry.overlap} "
                          "has no overlap (use e.g. 0.5)")
    seed_everything(cfg.seed)
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    stage_cfg = cfg.stages[stage]

    # The model first: a bad checkpoint or config fails in a second, before the data's hashing reads every image.
    built = build_stage(cfg, stage, vision_checkpoint=resume)   # fails fast (bad checkpoint, config) before any output
    data = data_record(cfg, data_fingerprint)
    system = built.system
    out.mkdir(parents=True, exist_ok=True)
    dump_run_config(cfg, out / "config.yaml")
    write_json_atomic(out / "checkpoint_metadata.json", {
        "config_hash": config_hash(cfg), "stage": stage, "cell_id": cfg.cell_id,
        "resampler_init": built.resampler_init, "init_sources": built.init_sources,
        "trainable_params": {k: v[0] for k, v in built.param_counts.items()},
        "total_params": {k: v[1] for k, v in built.param_counts.items()},
        "model": system.model.describe(), "vicreg_pairs": system.num_vicreg_pairs,
        # The checkpoints this stage started from, relative to its run directory (evaluation resolves them there).
        "paths": run_paths(out, vision_checkpoint=built.vision_checkpoint,
                           previous_checkpoint=built.previous_checkpoint),
    })

    datamodule = PanoDataModule(cfg, stage, built.prompts, system.model.pad_id)
    throughput = ThroughputCallback()
    grad_check = GradientFlowCheck()
    loss_curve = LossCurve()
    val_every = min(stage_cfg.val_every_n_steps, stage_cfg.max_steps)
    best = ModelCheckpoint(dirpath=out, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                           save_last=False, enable_version_counter=False, auto_insert_metric_name=False)
    last = ModelCheckpoint(dirpath=out, filename="last", save_top_k=0, save_last=True,
                           every_n_train_steps=min(stage_cfg.checkpoint_every_n_steps, stage_cfg.max_steps),
                           enable_version_counter=False)
    trainer = pl.Trainer(
        accelerator=_accelerator(cfg), devices=cfg.runtime.devices, precision=cfg.runtime.precision,
        max_steps=stage_cfg.max_steps, max_epochs=-1, val_check_interval=val_every, check_val_every_n_epoch=None,
        limit_val_batches=stage_cfg.limit_val_batches, accumulate_grad_batches=stage_cfg.accumulate_grad_batches,
        callbacks=[best, last, throughput, grad_check, loss_curve, TQDMProgressBar(refresh_rate=10)],
        plugins=[AtomicCheckpointIO()],   # best/last.ckpt replaced atomically, also on shared cluster filesystems
        logger=CSVLogger(out, name="logs", version=""), default_root_dir=out, deterministic=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, use_distributed_sampler=False,
    )
    ckpt_path = out / "last.ckpt"
    resume_from = str(ckpt_path) if ckpt_path.exists() else None
    if resume_from:
        logger.info("resuming stage %s from %s", stage, resume_from)

    flops = _count_step_flops(system, datamodule, cfg) if cfg.runtime.measure_flops else None
    if stage_compiles(cfg, stage):   # after the FLOP count: the counter sees the eager ops, the steps run compiled
        logger.info("compiled %d transformer blocks", compile_blocks(system.model, _accelerator(cfg)))
    trainer.fit(system, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    if not (out / "best.ckpt").exists():
        raise CheckpointError(f"{out}: training finished without a best.ckpt (no validation ran?)")
    record = _measurements(cfg, stage, system, built, throughput, flops, datamodule)
    record["loss"].update(_best_validation(best, out / "best.ckpt", system))
    record["loss"].update(loss_curve.record())
    record["gradient_check"] = grad_check.report
    record["data"] = data
    if not trainer.is_global_zero:   # DDP: rank 0 writes the stage's outputs
        return record
    if spec.attaches_lora:
        system.model.lm.save_pretrained(out / "lora_weights", safe_serialization=True)
    write_json_atomic(out / "measurements.json", record)
    logger.info("stage %s done: %s", stage, {k: record["speed"][k] for k in ("samples_per_s", "step_time_median_s")})
    return record


def _best_validation(best: ModelCheckpoint, best_file: Path, system: Any) -> dict[str, Any]:
    """The validation loss of the checkpoint that is scored (best.ckpt), the step it was saved at, and the last one.

    ``best_model_score`` is what ModelCheckpoint selected best.ckpt by (restored on resume); the step is read from
    best.ckpt itself, so the record names exactly the weights that evaluation loads.
    """
    score = best.best_model_score
    last = system.trainer.callback_metrics.get("val/loss") if system.trainer else None
    return {"best_val": float(score) if score is not None else None,
            "best_val_step": load_checkpoint_file(best_file).get("global_step"),
            "last_val": float(last) if last is not None else None}


def _count_step_flops(system: Any, data: PanoDataModule, cfg: RunConfig) -> ModelFlops | None:
    """Model FLOPs of one forward+backward micro-batch (measurement.flops convention), counted on the first
    training batch; gradients are discarded (weights unchanged)."""
    data.setup()
    collate = data.collate
    batch = collate([data.train_set[i] for i in range(min(len(data.train_set), cfg.stages[system.stage].batch_size))])
    device = build_device(cfg) if _accelerator(cfg) == "cuda" else torch.device("cpu")
    system.to(device)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.runtime.precision.startswith("bf16"))

    def step() -> None:
        with autocast:
            loss = system.compute_loss(batch)
        loss.backward()

    flops = count_model_flops(step, device.type, module=system)
    system.zero_grad(set_to_none=True)   # the model stays where it is: Lightning trains it on this device
    return flops


def _cost(cfg: RunConfig, flops: ModelFlops | None, step_time_s: float | None) -> dict[str, Any]:
    """MFU by the field's convention (model FLOPs / step time / the device's datasheet dense bf16 peak), per device,
    and separately against the bf16 matmul rate measured on this device."""
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() and _accelerator(cfg) == "cuda" else None
    if cfg.runtime.device_peak_tflops:
        peak, source = cfg.runtime.device_peak_tflops * 1e12, "runtime.device_peak_tflops"
    else:
        peak, part = datasheet_peak_flops(device_name)
        source = f"datasheet: {part}" if part else None
    measured = measured_peak_flops() if device_name else None
    total = flops.total if flops else None
    return {"flops_per_step": total, "attention_flops_per_step": flops.attention if flops else None,
            "flops_convention": "model FLOPs of one micro-batch per device: matmuls + attended (query, key) pairs "
                                "(causal counted once), no recompute",
            "device_peak_flops": peak, "device_peak_source": source, "mfu": mfu(total, step_time_s, peak),
            "measured_peak_flops": measured, "mfu_measured_peak": mfu(total, step_time_s, measured)}


def _measurements(cfg: RunConfig, stage: str, system: Any, built: Any, tp: ThroughputCallback,
                  flops: ModelFlops | None, data: PanoDataModule) -> dict[str, Any]:
    desc = system.model.describe()
    timing = summarize_step_times(tp.clock.times, cfg.runtime.measure_warmup_steps)
    batch = cfg.stages[stage].batch_size
    median = timing["step_time_median_s"]
    text_per_sample = (sum(tp.text_tokens) / max(1, sum(tp.samples))) if tp.samples else None
    # A stage without the LM (VICReg) sees every view's full token grid; the others what reaches the LM.
    captions = get_stage(stage).captions
    visual = desc["visual_tokens_per_sample"] if captions else desc["num_views"] * desc["vision_tokens_per_view"]
    world = system.trainer.world_size if system.trainer else 1   # DDP: every rank steps a batch of its own
    samples_per_s = batch * world / median if median else None
    text_rate = samples_per_s * text_per_sample if samples_per_s and captions else 0.0
    visual_rate = samples_per_s * visual if samples_per_s else None
    losses = system.step_losses
    counts = built.param_counts
    return {
        "cell_id": cfg.cell_id,
        "stage": stage,
        "status": "completed",
        "config_hash": config_hash(cfg),
        "knobs": {"overlap": cfg.geometry.overlap, "fov": cfg.geometry.fov, "resampler": cfg.resampler.type,
                  "vision_checkpoint": cfg.vision.checkpoint_name, "seed": cfg.seed},
        "geometry": {k: desc[k] for k in ("num_tiles", "num_views", "nominal_overlap", "effective_overlap")},
        "tokens": {"vision_tokens_per_view": desc["vision_tokens_per_view"],
                   "resampled_tokens_per_view": desc["resampled_tokens_per_view"],
                   "visual_tokens_per_sample": visual, "text_tokens_per_sample": text_per_sample,
                   "stitching": desc["stitching"]},
        "speed": {**timing, "batch_size": batch, "devices": world, "samples_per_s": samples_per_s,
                  "tokens_per_s": (visual_rate or 0.0) + (text_rate or 0.0) if samples_per_s else None,
                  "visual_tokens_per_s": visual_rate, "text_tokens_per_s": text_rate},
        "memory": {**peak_gpu_memory_gib(), "peak_host_rss_gib": peak_host_rss_gib()},
        "cost": _cost(cfg, flops, median),
        "params": {"trainable": sum(v[0] for v in counts.values()), "total": sum(v[1] for v in counts.values()),
                   "by_component": counts},
        "kernel_path": desc["kernel_path"],
        "resampler_init": built.resampler_init,
        "vicreg_pairs": system.num_vicreg_pairs,
        "loss": {"first": losses[0] if losses else None, "last": losses[-1] if losses else None,
                 "mean_last_10": statistics.fmean(losses[-10:]) if losses else None},
        "steps": int(system.global_step),
        "env": {**device_description(), "versions": package_versions(), "git_revision": git_revision(),
                "hostname": socket.gethostname(), "platform": platform.platform(), "pid": os.getpid()},
        "resolved_config": config_to_dict(cfg),
    }
