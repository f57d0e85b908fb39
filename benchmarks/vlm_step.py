"""The panobench training step itself (PanoVLMSystem built by the real builder), timed in one process.

Where the workflow pays process start, data loading and checkpoints per cell, this times only the step (forward,
backward, AdamW) on a synthetic batch, for several variants in one call, so changes can be compared side by side
with the naive step of ``naive_step.py`` and with the harness in the same session. The model is built exactly as
``panobench train`` builds it (``build_model``, LoRA, the stage's trainable set, gradient checkpointing, compiled
blocks, bf16 autocast); stage 3 starts from fresh stage-2 weights (speed does not depend on the values). FLOPs and
MFU follow ``panobench.measurement.flops`` (the convention the harness records).

    python benchmarks/vlm_step.py --config config/gpu-speed.yaml --variants base,compile,compile+gc \\
        --resamplers mlp,bimamba --views 5,9 --batch 8 --steps 10 --profile --out vlm_step.json
    python benchmarks/vlm_step.py --cpu --config config/gpu-speed.yaml config/gpu-speed-smoke.yaml \\
        --variants base,compile --views 5 --batch 2 --steps 2 --warmup 1 --out /tmp/vlm_step.json   # CPU mode

Variants, joined with ``+``: ``base`` (eager), ``gc`` (gradient checkpointing of the LM decoder layers),
``compile`` (every transformer block compiled, as ``runtime.compile`` does: inductor on CUDA, aot_eager on CPU).
``--config`` takes workflow config files merged in order over ``config/config.yaml``, as Snakemake's
``--configfile`` does. ``--cpu`` runs the same code on the CPU (use a tiny config such as gpu-speed-smoke.yaml).
``--profile`` adds a torch.profiler table of one step per variant for the first resampler and view count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from panobench import matrix as pm
from panobench.config import run_config_from_dict
from panobench.measurement.flops import count_model_flops, datasheet_peak_flops, mfu
from panobench.measurement.throughput import GIB, measured_peak_flops, summarize_step_times
from panobench.models.assembly import attach_lora, build_model, compile_blocks, enable_gradient_checkpointing
from panobench.stages import STAGES, component_of
from panobench.training.system import PanoVLMSystem
from panobench.utils.repro import device_description, git_revision, package_versions

logger = logging.getLogger("vlm_step")
OVERLAP_FOR_VIEWS = {5: 0.0, 7: 0.25, 9: 0.5}   # fov 90, one pitch row: 4 / 6 / 8 tiles + the global view
VARIANT_PARTS = {"base", "gc", "compile"}


def run_config(wf: dict[str, Any], views: int, resampler: str, stage: str, batch: int, gc: bool,
               device: torch.device) -> Any:
    """The resolved config of the cell with this many views and this resampler (first vision checkpoint, first
    seed), with the batch size and gradient checkpointing of the variant."""
    if views not in OVERLAP_FOR_VIEWS:
        raise ValueError(f"--views {views}: expected one of {sorted(OVERLAP_FOR_VIEWS)}")
    fov = float(wf["run"].get("geometry", {}).get("fov", 90.0))
    cell = pm.Cell(OVERLAP_FOR_VIEWS[views], fov, resampler, pm.vision_checkpoints(wf)[0], wf["matrix"]["seeds"][0])
    data = pm.resolve_cell(wf, cell)
    data["stages"][stage].update(batch_size=batch, gradient_checkpointing=gc)
    data["runtime"]["accelerator"] = device.type
    return run_config_from_dict(data)


def build_system(cfg: Any, stage: str, device: torch.device) -> PanoVLMSystem:
    """build_model + LoRA (stage 3) + gradient checkpointing + the stage's trainable set, as panobench train."""
    model, _, prompts = build_model(cfg, stage)
    if STAGES[stage].attaches_lora:
        attach_lora(model, cfg)
    if cfg.stages[stage].gradient_checkpointing:
        enable_gradient_checkpointing(model)
    system = PanoVLMSystem(cfg, stage, model)
    keep = STAGES[stage].trained_components(
        resampler_has_grid=model.resampler.output_grid(model.vision.grid) is not None,
        train_resampler=cfg.stages[stage].train_resampler)
    for name, p in system.named_parameters():
        p.requires_grad_(component_of(name) in keep)
    system.placeholder = prompts.placeholder_id
    return system.to(device).train()


def synthetic_batch(cfg: Any, system: PanoVLMSystem, batch: int, text_len: int, device: torch.device) -> dict:
    """ERP [B, 3, H, W] uint8 and a prompt of ``text_len`` tokens with one placeholder; the last 40 are targets."""
    g = torch.Generator().manual_seed(0)
    erp = torch.randint(0, 256, (batch, 3, cfg.data.erp_height, cfg.data.erp_width), generator=g, dtype=torch.uint8)
    vocab = int(system.model.causal_lm().config.vocab_size)
    ids = torch.randint(10, min(300, vocab), (batch, text_len), generator=g)
    ids[ids == system.placeholder] = 11
    ids[:, 4] = system.placeholder
    labels = torch.full_like(ids, -100)
    labels[:, -min(40, text_len - 5):] = ids[:, -min(40, text_len - 5):]
    out = {"erp": erp, "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(system: PanoVLMSystem, batch: dict, steps: int, warmup: int, device: torch.device,
               bf16: bool) -> tuple[list[float], Any]:
    params = [p for p in system.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step() -> None:
        with autocast:
            loss = system.compute_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[warmup:], step


def profile_summary(step: Any, device: torch.device, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


def measure_variant(wf: dict[str, Any], variant: str, resampler: str, views: int, batch: int, args: argparse.Namespace,
                    device: torch.device, peaks: dict[str, Any], profiles: dict[str, str]) -> dict[str, Any]:
    parts = set(variant.split("+"))
    row: dict[str, Any] = {"variant": variant, "resampler": resampler, "views": views, "batch": batch,
                           "stage": args.stage}
    cfg = run_config(wf, views, resampler, args.stage, batch, "gc" in parts, device)
    bf16 = cfg.runtime.precision.startswith("bf16")
    system = build_system(cfg, args.stage, device)
    b = synthetic_batch(cfg, system, batch, args.text_len, device)

    def fwd_bwd() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = system.compute_loss(b)
        loss.backward()

    counted = count_model_flops(fwd_bwd, device.type, module=system)   # eager, as panobench train counts (before compiling)
    system.zero_grad(set_to_none=True)
    if "compile" in parts:
        compile_blocks(system.model, device.type)
    t_first = time.perf_counter()
    times, step = time_steps(system, b, args.steps, args.warmup, device, bf16)
    timing = summarize_step_times(times, 0)
    median = timing["step_time_median_s"]
    flops = counted.total if counted else None
    row.update(
        warmup_s=time.perf_counter() - t_first - sum(times),   # the warm-up steps, compilation included
        step_ms=1e3 * median, p90_ms=1e3 * timing["step_time_p90_s"], measured_steps=len(times),
        samples_per_s=batch / median, flops_per_step=flops,
        attention_flops_per_step=counted.attention if counted else None,
        device_peak_flops=peaks["device_peak_flops"], mfu=mfu(flops, median, peaks["device_peak_flops"]),
        measured_peak_flops=peaks["measured_peak_flops"],
        mfu_measured_peak=mfu(flops, median, peaks["measured_peak_flops"]),
        alloc_gib=torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
        reserved_gib=torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None,
        kernel_path=system.model.describe()["kernel_path"], visual_tokens=system.model.num_visual_tokens,
        text_tokens=args.text_len, status="ok",
        attn=str(getattr(system.model.causal_lm().config, "_attn_implementation", None)),
        vision_attn=str(getattr(system.model.vision.model.config, "_attn_implementation", None)))
    if args.profile and resampler == args.resamplers[0] and views == args.views[0]:
        profiles[f"{variant}-{resampler}-v{views}-b{batch}"] = profile_summary(step, device)
    return row


def _list(kind: type) -> Any:
    return lambda text: [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", nargs="+", default=["config/gpu-speed.yaml"],
                    help="workflow config file(s), merged in order over config/config.yaml")
    ap.add_argument("--stage", default="finetune", choices=["resampler", "finetune"])
    ap.add_argument("--variants", type=_list(str), default=["base", "compile"],
                    help="comma-separated: base, gc, compile, or joined with + (compile+gc)")
    ap.add_argument("--resamplers", type=_list(str), default=["mlp", "bimamba"])
    ap.add_argument("--views", type=_list(int), default=[5, 9])
    ap.add_argument("--batch", type=_list(int), default=[8])
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--cpu", action="store_true", help="same as --device cpu")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    for variant in args.variants:
        unknown = set(variant.split("+")) - VARIANT_PARTS
        if unknown:
            ap.error(f"variant {variant!r}: unknown part(s) {sorted(unknown)}; expected {sorted(VARIANT_PARTS)}")
    if args.cpu:
        args.device = "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    wf = pm.load_workflow(args.config)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak, part = datasheet_peak_flops(name)
    peaks = {"device_peak_flops": peak, "device_peak_source": f"datasheet: {part}" if part else None,
             "measured_peak_flops": measured_peak_flops() if device.type == "cuda" else None}
    rows: list[dict[str, Any]] = []
    profiles: dict[str, str] = {}
    for variant in args.variants:
        for resampler in args.resamplers:
            for views in args.views:
                for batch in args.batch:
                    try:
                        row = measure_variant(wf, variant, resampler, views, batch, args, device, peaks, profiles)
                    except torch.OutOfMemoryError as err:
                        row = {"variant": variant, "resampler": resampler, "views": views, "batch": batch,
                               "stage": args.stage, "status": "oom", "error": str(err).splitlines()[0]}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print(table(rows, peaks))
    if args.out:
        record = {"env": {**device_description(), "versions": package_versions(), "git_revision": git_revision()},
                  "device": str(device), "config": args.config, "stage": args.stage, **peaks, "rows": rows,
                  "profiles": profiles}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


def table(rows: list[dict[str, Any]], peaks: dict[str, Any]) -> str:
    def fmt(value: Any, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    lines = [f"peaks: datasheet {fmt(peaks['device_peak_flops'] and peaks['device_peak_flops'] / 1e12, '.0f')} "
             f"TFLOP/s, measured {fmt(peaks['measured_peak_flops'] and peaks['measured_peak_flops'] / 1e12, '.0f')}",
             f"{'variant':11s} {'resampler':9s} {'views':>5s} {'b':>2s} {'step ms':>8s} {'samples/s':>9s} "
             f"{'alloc GiB':>9s} {'MFU':>6s} {'MFU meas':>8s} kernel"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['variant']:11s} {r['resampler']:9s} {r['views']:5d} {r['batch']:2d} {r['status']}")
            continue
        lines.append(f"{r['variant']:11s} {r['resampler']:9s} {r['views']:5d} {r['batch']:2d} {r['step_ms']:8.1f} "
                     f"{r['samples_per_s']:9.2f} {fmt(r['alloc_gib'], '9.1f'):>9s} {fmt(r['mfu'], '6.3f'):>6s} "
                     f"{fmt(r['mfu_measured_peak'], '8.3f'):>8s} {r['kernel_path']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
