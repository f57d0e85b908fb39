"""Fabricate the records a finished (or partly failed) workflow leaves behind, per docs/records.md.

The manifest comes from the real :func:`panobench.matrix.manifest`, so cell ids and paths are the workflow's own;
the JSON/TSV/log contents are made up but deterministic (functions of the knobs), so tests can recompute them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from panobench.matrix import manifest as build_manifest

RESAMPLER_QUALITY = {"mlp": 0.00, "bimamba": 0.03, "qformer": 0.05, "perceiver": 0.04}
RESAMPLER_SPEED = {"mlp": 1.00, "bimamba": 0.55, "qformer": 0.80, "perceiver": 0.85}
BENCH_HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time"
FINGERPRINT = "ab" * 32                     # the data fingerprint every fabricated record carries
TRAIN_SCHEDULE = {"vision": (20, 2), "resampler": (30, 1), "finetune": (40, 4)}   # stage -> (max_steps, accumulate)
GEN_SECONDS_PER_SAMPLE = 0.02               # decoding time per sample in every fabricated generation.json
GEN_BENCH_S = 30.0                          # wall time of each cell's generate job
SCORE_BENCH_S = 42.0                        # wall time of the one score job


def workflow_config(name: str, overlaps: Sequence[float], resamplers: Sequence[str], seeds: Sequence[int],
                    vision: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"name": name, "run": {"geometry": {"fov": 90.0}},
            "matrix": {"overlaps": list(overlaps), "resamplers": list(resamplers), "seeds": list(seeds),
                       "vision_checkpoints": [dict(v) for v in vision]}}


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _num_tiles(overlap: float) -> int:
    import math
    return math.ceil(360.0 / (90.0 * (1.0 - overlap)))


def bench_s(stage: str) -> float:
    """Wall time of a fabricated training job (its benchmark TSV)."""
    return {"vision": 20.0, "resampler": 12.5, "finetune": 15.0}[stage]


def measurements(knobs: Mapping[str, Any], stage: str, cell_id: str, device_type: str,
                 tokens_per_view: int = 16) -> dict[str, Any]:
    tiles = _num_tiles(knobs["overlap"])
    views = tiles + 1
    speed = RESAMPLER_SPEED[knobs["resampler"]] * (5.0 / views) * (1.6 if stage == "resampler" else 1.0)
    step = 8 / (40.0 * speed)
    gpu = device_type == "cuda"
    return {
        "cell_id": cell_id, "stage": stage, "status": "completed",
        "config_hash": hashlib.sha256(cell_id.encode()).hexdigest()[:16],
        "knobs": dict(knobs),
        "geometry": {"num_tiles": tiles, "num_views": views, "nominal_overlap": knobs["overlap"],
                     "effective_overlap": 1 - (360.0 / tiles) / 90.0},
        "tokens": {"vision_tokens_per_view": 64, "resampled_tokens_per_view": tokens_per_view,
                   "visual_tokens_per_sample": tokens_per_view * views, "text_tokens_per_sample": 31.5},
        "speed": {"measured_steps": 98, "step_time_median_s": step + 0.001 * knobs["seed"], "batch_size": 8,
                  "devices": 1,
                  "step_time_p90_s": step * 1.3, "samples_per_s": 8 / step, "tokens_per_s": 8 / step * (64 * views + 31.5),
                  "visual_tokens_per_s": 8 / step * 64 * views, "text_tokens_per_s": 8 / step * 31.5},
        "memory": {"peak_gpu_allocated_gib": 4.0 * views if gpu else None,
                   "peak_gpu_reserved_gib": 4.5 * views if gpu else None, "peak_host_rss_gib": 1.0 + 0.1 * views},
        "cost": {"flops_per_step": 1.0e10 * views, "device_peak_flops": 9.9e14 if gpu else None,
                 "mfu": (1.0e10 * views / step / 9.9e14) if gpu else None},
        "params": {"trainable": 1000 if stage == "resampler" else 3000, "total": 100000,
                   "by_component": {"vision": [0, 50000], "resampler": [1000, 1000]}},
        "kernel_path": "reference" if knobs["resampler"] == "bimamba" else "torch",
        "resampler_init": "fresh",
        "loss": {"first": 5.1, "last": 1.2, "best_val": 1.3, "best_val_step": 30, "last_val": 1.35},
        "gradient_check": {"step": 0, "grad_norm_by_component": {"resampler": 0.5}, "trainable_without_grad": 0},
        "data": {"fingerprint": FINGERPRINT, "format": 1, "num_images": 40, "csv": {}},
        "resolved_config": {"seed": knobs["seed"], "stages": {
            name: {"max_steps": steps, "batch_size": 8, "accumulate_grad_batches": accum}
            for name, (steps, accum) in TRAIN_SCHEDULE.items()}},
        "env": {"device": "NVIDIA H200" if gpu else "x86_64", "device_type": device_type,
                "versions": {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.17.0", "lightning": "2.6.0",
                             "cuda": "12.8" if gpu else None, "mamba-ssm": None},
                "git_revision": "0123456789abcdef0123456789abcdef01234567", "hostname": "node01"},
    }


def seed_noise(knobs: Mapping[str, Any], stage: str, scale: float = 0.03) -> float:
    """Deterministic noise in [-scale/2, scale/2) per cell and stage, so paired differences vary across seeds."""
    key = f"{knobs['overlap']}|{knobs['resampler']}|{knobs.get('vision_checkpoint')}|{knobs['seed']}|{stage}"
    return scale * (int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8 - 0.5)


def caption_metrics(knobs: Mapping[str, Any], stage: str) -> dict[str, float | None]:
    if stage == "baseline":
        base = 0.01
    elif stage == "blind":
        base = 0.10 + 0.01 * knobs["seed"]
    else:
        base = (0.30 if stage == "resampler" else 0.50) + 0.2 * knobs["overlap"] + RESAMPLER_QUALITY[knobs["resampler"]]
        base += 0.02 * knobs["seed"] + seed_noise(knobs, stage)
    return {"Bleu_1": base + 0.3, "Bleu_2": base + 0.2, "Bleu_3": base + 0.1, "Bleu_4": base, "METEOR": base / 2,
            "ROUGE_L": base + 0.15, "CIDEr": 2 * base, "SPICE": None}


def generation_record(stage: str, device_type: str, num_samples: int = 60) -> dict[str, Any]:
    return {"stage": stage, "checkpoint": f"{stage}/best.ckpt", "checkpoint_step": 30,
            "image": "constant grey 128" if stage == "blind" else "dataset",
            "decoding": {"num_beams": 1, "do_sample": False, "max_new_tokens": 40},
            "num_samples": num_samples, "seconds": GEN_SECONDS_PER_SAMPLE * num_samples,
            "tokens_per_s": 850.0, "latency_s_per_sample": GEN_SECONDS_PER_SAMPLE,
            "device": "NVIDIA H200" if device_type == "cuda" else "x86_64", "data": {"fingerprint": FINGERPRINT}}


def metrics_record(knobs: Mapping[str, Any], stage: str, device_type: str) -> dict[str, Any]:
    return {"metrics": caption_metrics(knobs, stage), "SPICE_reason": "CoreNLP jars not present",
            "num_groups": 60, "num_references": 300, "empty_predictions": 0, "mean_prediction_length_words": 9.1,
            "generation": generation_record(stage, device_type)}


def _bench(path: Path, seconds: float) -> None:
    _write(path, f"{BENCH_HEADER}\n{seconds}\t0:00:12\t2048.5\t4096\t1900\t1950\t0\t1\t95\t11\n")


def write_records(root: str | Path, *, name: str = "bench", overlaps: Sequence[float] = (0.0, 0.5),
                  resamplers: Sequence[str] = ("mlp", "qformer"), seeds: Sequence[int] = (0, 1),
                  vision: Sequence[Mapping[str, Any]] = ({"name": "pretrained"},), device_type: str = "cuda",
                  failures: Mapping[str, tuple[str, str]] | None = None, write_recipes: bool = True,
                  tokens_per_view: Mapping[str, int] | None = None) -> Path:
    """Write manifest + records under ``root``; returns the manifest path.

    ``failures`` maps cell_id -> (stage, log text): that training stage wrote nothing but its log, and
    later stages of the cell never ran (no files at all), its generate job included.
    ``tokens_per_view`` maps resampler -> its resampled tokens per view (default 16 for every arm).
    """
    root = Path(root)
    failures = dict(failures or {})
    wf = workflow_config(name, overlaps, resamplers, seeds, vision)
    man = build_manifest(wf)
    for cell in man["cells"]:
        cid, knobs = cell["cell_id"], cell["knobs"]
        _write(root / cell["config"], f"name: {name}\ncell_id: {cid}\nseed: {knobs['seed']}\n"
               f"geometry:\n  overlap: {knobs['overlap']}\nresampler:\n  type: {knobs['resampler']}\n")
        tpv = (tokens_per_view or {}).get(knobs["resampler"], 16)
        failed_stage, log_text = failures.get(cid, (None, ""))
        for stage in ("resampler", "finetune"):
            paths = cell["stages"][stage]
            if failed_stage is not None and (stage == failed_stage or failed_stage == "resampler"):
                if stage == failed_stage:
                    _write(root / paths["log"], log_text)
                continue
            _write(root / paths["log"], "INFO training started\nINFO done\n")
            _write(root / paths["measurements"], json.dumps(measurements(knobs, stage, cid, device_type, tpv)))
            _bench(root / paths["benchmark"], bench_s(stage))
        # The generate job: the baseline needs no training, but the workflow runs one job per cell after training.
        generated = ["baseline"] if failed_stage else list(cell["evals"])
        for stage in generated:
            ev = cell["evals"][stage]
            _write(root / ev["generation"], json.dumps(generation_record(stage, device_type)))
            _write(root / ev["metrics"], json.dumps(metrics_record(knobs, stage, device_type)))
        if not failed_stage:
            _bench(root / cell["evals"]["baseline"]["benchmark"], GEN_BENCH_S)
    _bench(root / "benchmarks" / name / "score.tsv", SCORE_BENCH_S)
    if write_recipes:
        for recipe in man["vision_recipes"]:
            knobs = {"overlap": 0.5, "fov": 90.0, "resampler": "mlp", "vision_checkpoint": recipe["name"], "seed": 0}
            _write(root / recipe["measurements"],
                   json.dumps(measurements(knobs, "vision", recipe["recipe_id"], device_type)))
            _bench(root / recipe["benchmark"], bench_s("vision"))
    manifest_path = root / "results" / name / "manifest.json"
    _write(manifest_path, json.dumps(man, indent=2))
    return manifest_path
