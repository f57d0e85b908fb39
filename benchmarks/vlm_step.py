"""The panobench training step itself (PanoVLMSystem built by the real builder), timed in one process.

Where the workflow pays process start, data loading and checkpoints per cell, this times only the step
(forward, backward, fused AdamW) on a synthetic batch, for several variants in one call, so changes can be compared
side by side with the naive step of ``naive_step.py`` in the same session. Builds the cell's model exactly as
``panobench train`` does (``build_model`` + LoRA + the stage's freeze); stage 3 here starts from the fresh stage-2
weights (no checkpoint needed: speed does not depend on the values).

    python benchmarks/vlm_step.py --config config/gpu-speed.yaml --variants base,gc,compile,compile+gc \
        --resamplers mlp,bimamba --views 5,9 --batch 8 --steps 12 --profile --out vlm_step.json

Variants: ``base`` (eager), ``gc`` (gradient checkpointing of the LM decoder layers), ``compile``
(``runtime.compile``: every transformer block compiled, as ``panobench train`` does), joined with ``+``.

``--profile`` adds a torch.profiler summary (top CUDA ops of one step) per variant of the first resampler/view.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from panobench import matrix as pm
from panobench.config import run_config_from_dict
from panobench.measurement.throughput import count_flops, measure_bf16_matmul_peak
from panobench.training.builder import attach_lora, build_model, compile_blocks, enable_gradient_checkpointing
from panobench.training.stages import component_of
from panobench.training.system import PanoVLMSystem

logger = logging.getLogger("vlm_step")
OVERLAP_FOR_VIEWS = {5: 0.0, 7: 0.25, 9: 0.5}


def load_workflow(path: str) -> dict[str, Any]:
    base = yaml.safe_load(Path("config/config.yaml").read_text())
    return pm._deep_merge(base, yaml.safe_load(Path(path).read_text()))


def run_config(wf: dict[str, Any], views: int, resampler: str, batch: int, gc: bool) -> Any:
    cell = next(c for c in pm.expand_cells(wf) if c.overlap == OVERLAP_FOR_VIEWS[views] and c.resampler == resampler)
    data = pm.resolve_cell(wf, cell)
    data["stages"]["finetune"]["batch_size"] = batch
    data["stages"]["finetune"]["gradient_checkpointing"] = gc
    return run_config_from_dict(data)


def build_system(cfg: Any, stage: str) -> PanoVLMSystem:
    model, _, prompts = build_model(cfg, stage)
    if stage == "finetune":
        attach_lora(model, cfg)
    if cfg.stages[stage].gradient_checkpointing:
        enable_gradient_checkpointing(model)
    system = PanoVLMSystem(cfg, stage, model)
    keep = {"resampler", "projector", "pe"} | ({"lora"} if stage == "finetune" else set())
    for name, p in system.named_parameters():
        p.requires_grad_(component_of(name) in keep)
    system.placeholder = prompts.placeholder_id
    return system.cuda().train()


def synthetic_batch(cfg: Any, system: PanoVLMSystem, batch: int, text_len: int, device: torch.device) -> dict:
    """ERP [B, 3, H, W] uint8 and a prompt of ``text_len`` tokens with one placeholder; the last 40 are targets."""
    g = torch.Generator().manual_seed(0)
    erp = torch.randint(0, 256, (batch, 3, cfg.data.erp_height, cfg.data.erp_width), generator=g, dtype=torch.uint8)
    ids = torch.randint(10, 300, (batch, text_len), generator=g)
    ids[ids == system.placeholder] = 11
    ids[:, 4] = system.placeholder
    labels = torch.full_like(ids, -100)
    labels[:, -40:] = ids[:, -40:]
    out = {"erp": erp, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def time_steps(system: PanoVLMSystem, batch: dict, steps: int, warmup: int) -> tuple[list[float], Any]:
    opt = torch.optim.AdamW([p for p in system.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = system.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[warmup:], step


def profile_summary(step: Any, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="config/gpu-speed.yaml")
    ap.add_argument("--stage", default="finetune", choices=["resampler", "finetune"])
    ap.add_argument("--variants", default="base,gc",
                    help="comma-separated: base, gc (LM gradient checkpointing), compile (blocks compiled), e.g. compile+gc")
    ap.add_argument("--resamplers", default="mlp,bimamba")
    ap.add_argument("--views", default="5,9")
    ap.add_argument("--batch", default="8")
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    wf = load_workflow(args.config)
    peak = measure_bf16_matmul_peak("cuda")
    rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    for variant in args.variants.split(","):
        for resampler in args.resamplers.split(","):
            for views in [int(v) for v in args.views.split(",")]:
                for batch in [int(b) for b in args.batch.split(",")]:
                    row: dict[str, Any] = {"variant": variant, "resampler": resampler, "views": views,
                                           "batch": batch, "stage": args.stage}
                    system = None
                    try:
                        parts = set(variant.split("+"))
                        cfg = run_config(wf, views, resampler, batch, "gc" in parts)
                        system = build_system(cfg, args.stage)
                        b = synthetic_batch(cfg, system, batch, args.text_len, torch.device("cuda"))

                        def fwd_bwd(system: PanoVLMSystem = system, b: dict = b) -> None:
                            with torch.autocast("cuda", dtype=torch.bfloat16):
                                loss = system.compute_loss(b)
                            loss.backward()

                        flops = count_flops(fwd_bwd)   # eager, as panobench train counts them (before compiling)
                        system.zero_grad(set_to_none=True)
                        if "compile" in parts:
                            compile_blocks(system.model)
                        t_first = time.perf_counter()
                        times, step = time_steps(system, b, args.steps, args.warmup)
                        row["warmup_s"] = time.perf_counter() - t_first - sum(times)   # includes compilation
                        med = statistics.median(times)
                        row.update(step_ms=1e3 * med, p90_ms=1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
                                   samples_per_s=batch / med, flops_per_step=flops, mfu=flops / med / peak,
                                   alloc_gib=torch.cuda.max_memory_allocated() / 2**30,
                                   reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                                   kernel_path=system.model.describe()["kernel_path"],
                                   visual_tokens=system.model.num_visual_tokens,
                                   attn=str(getattr(system.model.causal_lm().config, "_attn_implementation", None)),
                                   vision_attn=str(getattr(system.model.vision.model.config,
                                                           "_attn_implementation", None)))
                        if args.profile and resampler == args.resamplers.split(",")[0] and \
                                views == int(args.views.split(",")[0]):
                            profiles[f"{variant}-{resampler}-v{views}-b{batch}"] = profile_summary(step)
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "oom"
                    except Exception as err:  # noqa: BLE001 — record and go on with the other variants
                        row["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
                        logger.exception("variant %s failed", row)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    del system
                    torch.cuda.empty_cache()
    print(f"\nbf16 matmul peak {peak / 1e12:.0f} TFLOP/s; stage {args.stage}")
    print(f"{'variant':8s} {'resampler':9s} {'views':>5s} {'b':>2s} {'step ms':>8s} {'samples/s':>9s} "
          f"{'alloc GiB':>9s} {'resv GiB':>8s} {'MFU':>5s} kernel")
    for r in rows:
        if "step_ms" in r:
            print(f"{r['variant']:8s} {r['resampler']:9s} {r['views']:5d} {r['batch']:2d} {r['step_ms']:8.1f} "
                  f"{r['samples_per_s']:9.2f} {r['alloc_gib']:9.1f} {r['reserved_gib']:8.1f} {r['mfu']:5.3f} "
                  f"{r['kernel_path']}")
        else:
            print(f"{r['variant']:8s} {r['resampler']:9s} {r['views']:5d} {r['batch']:2d} {r.get('status')}")
    if args.out:
        Path(args.out).write_text(json.dumps({"peak_flops": peak, "rows": rows, "profiles": profiles}, indent=1))
        for name, table in profiles.items():
            Path(args.out).with_name(f"profile-{name}.txt").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
