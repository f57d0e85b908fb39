"""Caption generation for one (cell, stage): one prediction per (image, query) group with one decoding config.

Stages: ``baseline`` = the untrained model exactly as stage 2 starts (vision source + seeded fresh
resampler/projector/PE), so the report shows how far training moved the metrics; ``resampler`` / ``finetune`` =
that stage's ``best.ckpt`` (else ``last.ckpt``), loaded strictly; ``blind`` = the finetuned model shown a constant
grey panorama (same prompt, same decoding): what it says without image information, so the report can show how
much the image helps. Writes ``predictions.csv`` and
``generation.json`` (decoding config, speed) atomically; scoring is a separate CPU step (``panobench score``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from panobench.config import RunConfig, config_hash
from panobench.data.csvdata import PanoramaCaptionDataset
from panobench.errors import CheckpointError
from panobench.evaluation.predictions import GENERATION_SIDECAR, write_predictions
from panobench.matrix import EVAL_CHECKPOINT_STAGE, EVAL_STAGES
from panobench.training.builder import build_stage, load_stage_checkpoint, stage_dir
from panobench.training.datamodule import GenerateCollator
from panobench.utils.io import read_json, write_json_atomic
from panobench.utils.repro import device_description, git_revision, package_versions, seed_everything

logger = logging.getLogger(__name__)

BLIND_GREY = 128   # the blind evaluation's constant panorama value (uint8, every channel)


def find_checkpoint(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir}: no best.ckpt or last.ckpt")


def generate_predictions(cfg: RunConfig, stage: str, out_dir: str | Path, *, csv_input: str | None = None,
                         checkpoint: str | Path | None = None,
                         data_fingerprint: str | Path | None = None) -> dict[str, Any]:
    """Generate captions for every (image, query) group of ``csv_input`` (default: the config's test CSV).

    ``data_fingerprint``: JSON from ``panobench fingerprint``, recorded in generation.json as ``data``.
    """
    if stage not in EVAL_STAGES:
        raise ValueError(f"unknown eval stage {stage!r}; expected one of {EVAL_STAGES}")
    seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.runtime.accelerator != "cpu" else "cpu")
    weights_stage = EVAL_CHECKPOINT_STAGE[stage]
    checkpoint_step = None
    if weights_stage is None:
        built = build_stage(cfg, "resampler", freeze=False)
        ckpt_path = None
    else:
        built = build_stage(cfg, weights_stage, freeze=False)
        ckpt_path = Path(checkpoint) if checkpoint else find_checkpoint(stage_dir(cfg, weights_stage))
        checkpoint_step = load_stage_checkpoint(built.system, ckpt_path).get("global_step")
    model = built.system.model.to(device).eval()
    prompts = built.prompts

    csv_path = csv_input or cfg.data.test_csv
    dataset = PanoramaCaptionDataset(csv_path, cfg.data.root, erp_size=(cfg.data.erp_height, cfg.data.erp_width),
                                     grouped=True)
    indices = list(range(len(dataset)))
    if cfg.data.max_eval_samples is not None:
        indices = indices[: cfg.data.max_eval_samples]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.eval.batch_size, shuffle=False,
                        collate_fn=GenerateCollator(prompts, model.pad_id), num_workers=cfg.data.num_workers)
    decoding = {"max_new_tokens": cfg.eval.max_new_tokens, "num_beams": cfg.eval.num_beams,
                "do_sample": cfg.eval.do_sample, "prompt_instruction": cfg.prompt_instruction}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.runtime.precision.startswith("bf16"))
    rows, new_tokens, seconds = [], 0, 0.0
    for batch in tqdm(loader, desc=f"generate {cfg.cell_id} [{stage}]", unit="batch"):
        erp = batch["erp"]
        if stage == "blind":
            erp = torch.full_like(erp, BLIND_GREY)   # no image information; prompt and decoding unchanged
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            out = model.generate(erp.to(device), batch["input_ids"].to(device),
                                 batch["attention_mask"].to(device), max_new_tokens=cfg.eval.max_new_tokens,
                                 num_beams=cfg.eval.num_beams, do_sample=cfg.eval.do_sample,
                                 eos_token_id=prompts.stop_token_ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        for item, ids in zip(batch["items"], out.tolist(), strict=True):
            kept = []
            for tok in ids:
                if tok in prompts.stop_token_ids:
                    break
                kept.append(tok)
            new_tokens += len(kept) + (1 if len(kept) < len(ids) else 0)
            rows.append({"sample_id": item["sample_id"], "image": item["url"], "query": item["query"],
                         "prediction": prompts.decode_answer(kept), "references": list(item["references"])})
    out_dir = Path(out_dir)
    generation = {
        "stage": stage, "checkpoint": str(ckpt_path) if ckpt_path else None, "checkpoint_step": checkpoint_step,
        "image": f"constant grey {BLIND_GREY}" if stage == "blind" else "dataset", "cell_id": cfg.cell_id,
        "config_hash": config_hash(cfg), "csv": str(csv_path), "decoding": decoding, "num_samples": len(rows),
        "generated_tokens": new_tokens, "seconds": seconds,
        "tokens_per_s": new_tokens / seconds if seconds else None,
        "latency_s_per_sample": seconds / len(rows) if rows else None,
        **device_description(), "versions": package_versions(), "git_revision": git_revision(),
        "data": read_json(data_fingerprint) if data_fingerprint else None,
    }
    write_json_atomic(out_dir / GENERATION_SIDECAR, generation)
    write_predictions(out_dir / "predictions.csv", rows)   # last: its presence marks a complete generation
    logger.info("%s [%s]: %d predictions, %.1f tokens/s", cfg.cell_id, stage, len(rows), generation["tokens_per_s"] or 0)
    return generation
