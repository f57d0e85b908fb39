"""One GPU session in one device call, and its CPU mode: the steps, their order, the deadline, the collection.

``run_gpu_session.sh`` / ``run_ddp_session.sh`` install what the device lacks and call this script; the CPU mode
(``--cpu``) runs the very same steps at tiny dimensions (config/gpu-speed-smoke.yaml as an extra overlay), so a
wrong Snakemake target, a renamed record field or a None in a division fails in CI, not on the GPU.

    python benchmarks/device/gpu_session.py single --out OUT [--cpu] [--deadline-epoch T]
    python benchmarks/device/gpu_session.py ddp --out OUT [--cpu] [--deadline-epoch T]
    python benchmarks/device/gpu_session.py fill-readme --summary OUT/summary.md [--block ddp|extras]  # the README
    python benchmarks/device/gpu_session.py digest        # the source digest a session's env.json must show

``single`` (one GPU), in order of value, each step skipped once the deadline is too close: environment (device,
datasheet and measured bf16 peaks); the naive reference step (stage 3, batch 8, 5 and 9 views); ``vlm_step.py``
compiled (mlp, 5 views, with a profile); the harness — Snakemake over config/gpu-speed.yaml +
config/gpu-speed-session.yaml — cell by cell (5 views mlp with generation at batch 32, 9 views mlp, 5 views
bimamba, 9 views bimamba); the same finetuned checkpoint generated once more on the plain path (token agreement);
more ``vlm_step.py`` rows (9 views, bimamba); the report. Then the collection: ``summary.json`` (every number and
each target with its threshold) and ``summary.md`` (the table for reports/gpu-speed/README.md).

``ddp`` (two GPUs): the one-GPU reference (config/gpu-speed-ddp-1gpu.yaml, GPU 0 only), then the same cell on two
GPUs (config/gpu-speed-ddp.yaml); scaling efficiency and the two loss curves compared: ``ddp_summary.json``/``.md``.
Then, unless ``EXTRAS=0``, the time left goes to the single-GPU rows a full single session may not reach in its ten
minutes (bimamba at 5 and 9 views with generation and the plain-path comparison, vlm_step.py's bimamba and 9-view
rows), on GPU 0: ``extras_summary.json``/``.md``, ``extras-harness.tar.gz``.

Everything kept lands in ``--out`` as at most 8 plain files (the device tool's limit); intermediate files go to
``--work`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))   # this checkout's panobench, also when another copy is installed

from panobench import matrix as pm  # noqa: E402

SESSION_CONFIGS = ["config/gpu-speed.yaml", "config/gpu-speed-session.yaml"]
DDP_CONFIGS = {"one": ["config/gpu-speed.yaml", "config/gpu-speed-ddp-1gpu.yaml"],
               "two": ["config/gpu-speed.yaml", "config/gpu-speed-ddp.yaml"]}
CPU_OVERLAY = "config/gpu-speed-smoke.yaml"   # tiny dimensions, CPU; goes right after gpu-speed.yaml
# The CPU mode's single session runs two of the four cells (mlp at 5 and 9 views; every step still runs): CI time.
# bimamba still runs in vlm_step.py here, and through the workflow in tests/workflow/test_gpu_speed_config.py.
CPU_SESSION_CELLS = {"matrix": {"overlaps": [0.0, 0.5], "resamplers": ["mlp"]}}
RESERVE_S = 25                                 # kept back for the collection after the last step

# Targets of issue 12 (the first five are read from the single-GPU session, the last two from the DDP session).
THRESHOLDS = {"harness_vs_naive": 3.0, "peak_allocated_gib": 20.0, "vlm_step_vs_harness": 1.15, "mfu": 0.40,
              "decode_tokens_per_s": 1500.0, "scaling_efficiency": 0.9}


def with_cpu_overlay(configs: list[str], cpu: bool) -> list[str]:
    return [configs[0], CPU_OVERLAY, *configs[1:]] if cpu else list(configs)


class Session:
    """Runs steps against a deadline and records what each did."""

    def __init__(self, out: Path, work: Path, cpu: bool, deadline: float) -> None:
        self.out, self.work, self.cpu, self.deadline = out, work, cpu, deadline
        self.steps: list[dict[str, Any]] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
                        NVSHMEM_DISABLE_NVLS="1", HF_HUB_OFFLINE="1")
        if cpu:
            self.env.setdefault("OMP_NUM_THREADS", "1")

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def run(self, name: str, cmd: list[str], *, need_s: float, env: dict[str, str] | None = None) -> bool:
        """Run ``cmd`` in the repository root if at least ``need_s`` seconds are left; stopped at the deadline."""
        if self.left() < need_s:
            print(f"=== skip {name}: {self.left():.0f} s left, needs ~{need_s:.0f} s", flush=True)
            self.steps.append({"step": name, "status": "skipped (deadline)", "seconds": 0.0})
            return False
        print(f"=== [{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        # Its own process group: at the deadline the step's whole tree (Snakemake and its jobs) is stopped, so
        # nothing keeps the GPU or writes files while the collection reads them.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, start_new_session=True)
        try:
            status = "ok" if proc.wait(timeout=max(1.0, self.left())) == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = "stopped at the deadline"
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                    break
        seconds = time.time() - t0
        print(f"=== {name}: {status} after {seconds:.0f} s", flush=True)
        self.steps.append({"step": name, "status": status, "seconds": round(seconds, 1)})
        return status == "ok"

    def snakemake(self, name: str, targets: list[str], configs: list[str], *, need_s: float,
                  env: dict[str, str] | None = None) -> bool:
        cores = "2" if self.cpu else "16"
        # Targets first: --configfile takes every following word as a config file. --scheduler greedy: pulp (the
        # ILP scheduler's solver) is not carried to the device.
        cmd = [sys.executable, "-m", "snakemake", *targets, "--cores", cores, "--resources", "gpu=1",
               "--scheduler", "greedy", "--keep-going", "--configfile", *configs]
        return self.run(name, cmd, need_s=need_s, env=env)


# ------------------------------------------------------------------------------------------------ steps


SOURCE_GLOBS = ("Snakefile", "rules/*.smk", "config/*.yaml", "src/panobench/**/*.py", "src/panobench/**/*.j2",
                "benchmarks/*.py", "benchmarks/device/*.py", "benchmarks/device/*.sh")


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the code and configs that produce the numbers (path + content, sorted): the device's copy of the
    tree has no .git, so this is how a session's files are tied to a commit (``gpu_session.py digest`` here)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted({p for pattern in SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment(session: Session) -> dict[str, Any]:
    """Device, versions, the datasheet peak and the measured bf16 matmul rate of every visible GPU."""
    import torch

    from panobench.measurement.flops import datasheet_peak_flops
    from panobench.measurement.throughput import measure_bf16_matmul_peak
    from panobench.utils.repro import git_revision, package_versions

    env: dict[str, Any] = {"mode": "cpu" if session.cpu else "gpu", "versions": package_versions(),
                           "git_revision": git_revision(ROOT), "source_digest": source_digest(), "gpus": []}
    # The same code in the CPU mode, where it finds no GPU, no fused kernel and no nvidia-smi.
    for i in range(torch.cuda.device_count() if not session.cpu else 0):
        name = torch.cuda.get_device_name(i)
        peak, part = datasheet_peak_flops(name)
        env["gpus"].append({"index": i, "name": name, "datasheet_bf16_dense_flops": peak, "datasheet_part": part,
                            "measured_bf16_matmul_flops": measure_bf16_matmul_peak(torch.device("cuda", i))})
        with torch.cuda.device(i):
            torch.cuda.empty_cache()   # the jobs that follow get the whole GPU
    try:
        import selective_scan_cuda  # noqa: F401  the fused Mamba scan; fails on an ABI mismatch with torch
        env["mamba_ssm_fused"] = True
    except ImportError as err:
        env["mamba_ssm_fused"] = f"not importable: {err}"
    smi = shutil.which("nvidia-smi")
    if smi and not session.cpu:
        env["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,memory.total,clocks.sm,clocks.max.sm",
                                            "--format=csv,noheader"], capture_output=True, text=True).stdout
    (session.out / "env.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2), flush=True)
    return env


def naive_step(session: Session) -> None:
    args = (["--tiny", "--device", "cpu", "--batch", "2", "--steps", "2", "--warmup", "1", "--text-len", "16"]
            if session.cpu else ["--batch", "8", "--steps", "6", "--warmup", "3"])
    session.run("naive step (stage 3, 5 and 9 views)", [sys.executable, "benchmarks/naive_step.py", "--stages", "3",
                                                        "--views", "5,9", *args, "--out",
                                                        str(session.out / "naive_step.json")], need_s=60)


def vlm_step(session: Session, configs: list[str], part: str, resamplers: str, views: str, variants: str,
             profile: bool, need_s: float) -> None:
    args = (["--cpu", "--batch", "2", "--steps", "2", "--warmup", "1", "--text-len", "48"] if session.cpu
            else ["--batch", "8", "--steps", "10", "--warmup", "3"])
    cmd = [sys.executable, "benchmarks/vlm_step.py", "--config", *configs, "--variants", variants, "--resamplers",
           resamplers, "--views", views, *args, *(["--profile"] if profile else []),
           "--out", str(session.work / f"vlm_step-{part}.json")]
    session.run(f"vlm_step.py {variants} {resamplers} views {views}", cmd, need_s=need_s)


def cell_targets(wf: dict[str, Any], cell: pm.Cell, generation: bool) -> list[str]:
    """The files Snakemake must make for one cell: both training stages, and its generations if asked."""
    targets = [f"{pm.stage_dir(wf, cell.cell_id, stage, cell.resampler)}/measurements.json"
               for stage in pm.TRAIN_STAGES]
    if generation:
        targets += [f"{pm.eval_dir(wf, cell.cell_id, stage)}/generation.json" for stage in wf["eval_stages"]]
    return targets


def session_cells(wf: dict[str, Any]) -> list[pm.Cell]:
    """The harness cells in order of value: 5 views mlp, 9 views mlp, 5 views bimamba, 9 views bimamba, rest."""
    def rank(cell: pm.Cell) -> tuple[int, float]:
        return (0 if cell.resampler == "mlp" else 1 if cell.resampler == "bimamba" else 2, cell.overlap)

    return sorted(pm.expand_cells(wf), key=rank)


def plain_generation(session: Session, wf: dict[str, Any], cell: pm.Cell) -> None:
    """The finetuned checkpoint of ``cell`` generated on the plain path (HF dynamic cache, unmerged LoRA, eager):
    its tokens must equal the fast path's; its speed is the reference the fast path is compared with."""
    import yaml

    resolved = yaml.safe_load((ROOT / pm.config_path(wf, cell.cell_id)).read_text())
    resolved["eval"].update(static_cache=False, merge_lora=False, compile=False)
    plain_cfg = session.work / "plain-generation.yaml"
    plain_cfg.write_text(yaml.safe_dump(resolved, sort_keys=False))
    session.run(f"generation on the plain path ({cell.cell_id})",
                [sys.executable, "-m", "panobench", "generate", "--config", str(plain_cfg), "--stage", "finetune",
                 "--out", str(session.work / "plain-generation")], need_s=60 if not session.cpu else 10)


VIEWS = {0.0: 5, 0.25: 7, 0.5: 9}   # fov 90, one pitch row: tiles + the global view


# The single-GPU session, in order of value (each item skipped once the deadline is too close):
#   ("vlm", part, resampler, views, profile) | ("harness", resampler, views, with generation) | ("plain", resampler,
#   views) | ("generations",) the other cells' generations | ("report",)
SINGLE_PLAN: list[tuple[Any, ...]] = [
    ("vlm", "a", "mlp", 5, True), ("harness", "mlp", 5, True), ("harness", "mlp", 9, False), ("plain", "mlp", 5),
    ("harness", "bimamba", 5, False), ("vlm", "c", "bimamba", 5, False), ("harness", "bimamba", 9, False),
    ("vlm", "b", "mlp", 9, False), ("generations",), ("report",)]
# What the DDP call does with the time it has left (run_ddp_session.sh, EXTRAS=1): the rows a full single session
# may not reach in its ten minutes, on GPU 0 of the two-GPU machine (the same H200 model) — first the query-based
# arms, so that the GPU-hour bill has a measured step time for every resampler.
EXTRAS_PLAN: list[tuple[Any, ...]] = [
    ("harness", "perceiver", 5, False), ("harness", "qformer", 9, False), ("harness", "perceiver", 9, False),
    ("harness", "bimamba", 9, False), ("harness", "qformer", 5, False), ("harness", "bimamba", 5, True),
    ("plain", "bimamba", 5), ("vlm", "c", "bimamba", 5, False), ("vlm", "b", "mlp", 9, False)]
# The CPU mode's cells (every step still runs; CI time): mlp at 5 and 9 views for the single session, bimamba at 5
# views for the extras. bimamba through the whole workflow: tests/workflow/test_gpu_speed_config.py's smoke test.
CPU_CELLS = {"single": {"matrix": {"overlaps": [0.0, 0.5], "resamplers": ["mlp"]}},
             "extras": {"matrix": {"overlaps": [0.0], "resamplers": ["bimamba"]}}}


def single(session: Session, kind: str = "single") -> dict[str, Any]:
    """The single-GPU session (``kind`` "single") or the extras the DDP call runs afterwards ("extras")."""
    configs = with_cpu_overlay(SESSION_CONFIGS, session.cpu)
    if session.cpu:
        import yaml

        cut = session.work / f"cpu-{kind}-cells.yaml"
        cut.write_text(yaml.safe_dump(CPU_CELLS[kind]))
        configs.append(str(cut))
    wf = pm.load_workflow(configs, ROOT)
    if kind == "single":
        env = environment(session)
        naive_step(session)
    elif (session.out / "env.json").is_file():   # after the DDP part of the same call
        env = json.loads((session.out / "env.json").read_text())
    else:                                        # `gpu_session.py extras`: the extras on their own
        env = environment(session)
    # The tokenizer vlm_step.py builds with: the materialize rule, named by rule (not by an output file).
    session.run("prepare data and tokenizer",
                [sys.executable, "-m", "snakemake", "--until", "materialize_models", "fingerprint_data", "--cores",
                 "2" if session.cpu else "16", "--scheduler", "greedy", "--configfile", *configs], need_s=30)
    cells = session_cells(wf)
    by_key = {(c.resampler, VIEWS.get(c.overlap)): c for c in cells}
    generated: list[pm.Cell] = []
    for item in SINGLE_PLAN if kind == "single" else EXTRAS_PLAN:
        what, args = item[0], item[1:]
        if what == "vlm":
            part, resampler, views, profile = args
            vlm_step(session, configs, part, resampler, str(views), "compile", profile=profile,
                     need_s=150 if profile else 80)
        elif what == "harness" and (args[0], args[1]) in by_key:
            cell = by_key[(args[0], args[1])]
            session.snakemake(f"harness {cell.cell_id}", cell_targets(wf, cell, generation=args[2]), configs,
                              need_s=90 if args[2] else 70)
            generated += [cell] if args[2] else []
        elif what == "plain" and (args[0], args[1]) in by_key:
            plain_generation(session, wf, by_key[(args[0], args[1])])
        elif what == "generations":
            # The report needs every cell's generation: the other cells' come last, as far as time allows.
            later = [t for cell in cells if cell not in generated
                     for t in cell_targets(wf, cell, generation=True) if t.endswith("generation.json")]
            if later:
                session.snakemake("generation of the other cells", later, configs,
                                  need_s=20 if session.cpu else 60 * len(later))
        elif what == "report":
            if all((ROOT / t).is_file() for cell in cells for t in cell_targets(wf, cell, generation=True)):
                session.snakemake("report", [f"{pm.report_dir(wf)}/report.html"], configs, need_s=45)
            else:
                session.steps.append({"step": "report", "status": "skipped (not every cell finished)",
                                      "seconds": 0.0})
    plain_cell = next((by_key.get((i[1], i[2])) for i in (SINGLE_PLAN if kind == "single" else EXTRAS_PLAN)
                       if i[0] == "plain" and (i[1], i[2]) in by_key), None)
    return collect_single(session, wf, env, cells, configs, kind, plain_cell)


def ddp(session: Session) -> dict[str, Any]:
    env = environment(session)
    records = {}
    for key, gpus in (("one", "0"), ("two", "0,1")):
        configs = with_cpu_overlay(DDP_CONFIGS[key], session.cpu)
        wf = pm.load_workflow(configs, ROOT)
        cell = pm.expand_cells(wf)[0]
        run_env = dict(session.env) if session.cpu else dict(session.env, CUDA_VISIBLE_DEVICES=gpus)
        session.snakemake(f"harness {wf['name']} ({key} device(s))", cell_targets(wf, cell, generation=False),
                          configs, need_s=120, env=run_env)
        records[key] = {"name": wf["name"], "configs": configs,
                        "finetune": _read(ROOT / pm.stage_dir(wf, cell.cell_id, "finetune", cell.resampler)
                                          / "measurements.json")}
    summary = collect_ddp(session, env, records)
    if os.environ.get("EXTRAS", "1") != "0":
        session.steps = []
        single(session, "extras")
    return summary


# ------------------------------------------------------------------------------------------------ collection


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _target(name: str, value: float | None, threshold: float, at_most: bool = False) -> dict[str, Any]:
    met = None if value is None else (value <= threshold if at_most else value >= threshold)
    return {"target": name, "value": value, "threshold": threshold, "direction": "<=" if at_most else ">=",
            "met": met}


def harness_row(rec: dict[str, Any]) -> dict[str, Any]:
    cfg = rec["resolved_config"]
    stage_cfg = cfg["stages"][rec["stage"]]
    compiled = cfg["runtime"]["compile"] if stage_cfg.get("compile") is None else stage_cfg["compile"]
    return {"cell_id": rec["cell_id"], "stage": rec["stage"], "resampler": rec["knobs"]["resampler"],
            "views": rec["geometry"]["num_views"], "batch": rec["speed"]["batch_size"],
            "devices": rec["speed"]["devices"], "compiled": compiled,
            "gradient_checkpointing": stage_cfg["gradient_checkpointing"],
            "step_time_median_s": rec["speed"]["step_time_median_s"], "samples_per_s": rec["speed"]["samples_per_s"],
            "peak_gpu_allocated_gib": rec["memory"]["peak_gpu_allocated_gib"],
            "peak_gpu_reserved_gib": rec["memory"]["peak_gpu_reserved_gib"], **rec["cost"],
            "visual_tokens_per_sample": rec["tokens"]["visual_tokens_per_sample"],
            "text_tokens_per_sample": rec["tokens"]["text_tokens_per_sample"],
            "kernel_path": rec["kernel_path"], "loss_curve": rec["loss"].get("curve")}


def _tokens(row: dict[str, Any]) -> float:
    return row["visual_tokens_per_sample"] + (row["text_tokens_per_sample"] or 0)


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def collect_single(session: Session, wf: dict[str, Any], env: dict[str, Any], cells: list[pm.Cell],
                   configs: list[str], kind: str, plain_cell: pm.Cell | None) -> dict[str, Any]:
    """summary.json/.md and harness.tar.gz (``kind`` "single"), or extras_summary.* and extras-harness.tar.gz."""
    prefix = "" if kind == "single" else "extras_"
    naive = (_read(session.out / "naive_step.json") or {}).get("results", []) if kind == "single" else []
    vlm_parts = [_read(p) for p in sorted(session.work.glob("vlm_step-*.json"))]
    vlm_rows = [row for part in vlm_parts if part for row in part["rows"]]
    profiles = {k: v for part in vlm_parts if part for k, v in part.get("profiles", {}).items()}
    if kind == "single" and vlm_parts and vlm_parts[0]:
        merged = {k: v for k, v in vlm_parts[0].items() if k not in ("rows", "profiles")}
        (session.out / "vlm_step.json").write_text(json.dumps({**merged, "rows": vlm_rows, "profiles": profiles},
                                                              indent=1) + "\n")
    harness, generation = [], []
    for cell in cells:
        for stage in pm.TRAIN_STAGES:
            rec = _read(ROOT / pm.stage_dir(wf, cell.cell_id, stage, cell.resampler) / "measurements.json")
            if rec:
                harness.append(harness_row(rec))
        for stage in wf["eval_stages"]:
            rec = _read(ROOT / pm.eval_dir(wf, cell.cell_id, stage) / "generation.json")
            if rec:
                generation.append({"cell_id": cell.cell_id, "resampler": cell.resampler, **rec})
    plain = _read(session.work / "plain-generation" / "generation.json")
    agreement = _agreement(ROOT / pm.eval_dir(wf, plain_cell.cell_id, "finetune") / "predictions.csv",
                           session.work / "plain-generation" / "predictions.csv") if plain_cell else None

    def stage3(resampler: str, views: int) -> dict[str, Any] | None:
        return _find(harness, resampler=resampler, views=views, stage="finetune")

    head, head9 = stage3("mlp", 5), stage3("mlp", 9)
    naive5 = _find(naive, stage=3, views=5, status="ok")
    vlm5 = _find(vlm_rows, variant="compile", resampler="mlp", views=5, status="ok")
    gen = _find(generation, stage="finetune", resampler="mlp") or _find(generation, stage="finetune")
    targets = [
        _target("harness stage 3 samples/s / naive step samples/s (batch 8, 5 views, mlp)",
                _ratio(head and head["samples_per_s"], naive5 and naive5["samples_per_s"]),
                THRESHOLDS["harness_vs_naive"]),
        _target("harness peak GPU allocated GiB (stage 3, batch 8, 5 views, mlp)",
                head and head["peak_gpu_allocated_gib"], THRESHOLDS["peak_allocated_gib"], at_most=True),
        _target("vlm_step.py samples/s / harness samples/s (compiled, 5 views, mlp)",
                _ratio(vlm5 and vlm5["samples_per_s"], head and head["samples_per_s"]),
                THRESHOLDS["vlm_step_vs_harness"], at_most=True),
        _target("MFU, datasheet dense bf16 peak (stage 3, batch 8, 5 views, mlp)", head and head["mfu"],
                THRESHOLDS["mfu"]),
        _target(f"generation decode tokens/s (batch {gen['batch_size'] if gen else 32}, "
                f"{gen['cell_id'] if gen else 'finetuned cell'})", gen and gen["decode_tokens_per_s"],
                THRESHOLDS["decode_tokens_per_s"]),
        {"target": "9 views train (stage 3, batch 8, mlp)", "value": head9 and head9["samples_per_s"],
         "threshold": None, "direction": "runs", "met": None if head9 is None else head9["samples_per_s"] is not None},
    ]
    # The gradient-checkpointing rule's constant (benchmarks/README.md): LM activation memory per LM token, from the
    # 5- and 9-view stage-3 rows of one resampler (same batch; only the sequence length differs).
    per_token = None
    for resampler in ("mlp", "bimamba"):
        five, nine = stage3(resampler, 5), stage3(resampler, 9)
        if per_token is None and five and nine and five["peak_gpu_allocated_gib"] and nine["peak_gpu_allocated_gib"]:
            tokens = five["batch"] * (_tokens(nine) - _tokens(five))
            per_token = 1024 * (nine["peak_gpu_allocated_gib"] - five["peak_gpu_allocated_gib"]) / tokens \
                if tokens else None
    summary = {"kind": kind, "mode": env["mode"], "git_revision": env["git_revision"], "env": env,
               "activation_mib_per_lm_token": per_token, "configs": configs, "steps": session.steps,
               "targets": targets, "naive": naive, "vlm_step": vlm_rows, "harness": harness, "generation": generation,
               "generation_plain": plain, "generation_plain_cell": plain_cell.cell_id if plain_cell else None,
               "fast_vs_plain_identical_predictions": agreement}
    (session.out / f"{prefix}summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (session.out / f"{prefix}summary.md").write_text(single_markdown(summary))
    pack_harness(session.out / f"{prefix.replace('_', '-')}harness.tar.gz", [wf["name"]],
                 extra=[session.work / "plain-generation"])
    return summary


def _agreement(fast_csv: Path, plain_csv: Path) -> float | None:
    """Fraction of (image, query) groups whose fast-path caption equals the plain path's."""
    import csv

    try:
        fast = {r["sample_id"]: r["prediction"] for r in csv.DictReader(fast_csv.open(encoding="utf-8"))}
        plain = {r["sample_id"]: r["prediction"] for r in csv.DictReader(plain_csv.open(encoding="utf-8"))}
    except OSError:
        return None
    return sum(fast.get(k) == v for k, v in plain.items()) / len(plain) if plain else None


def collect_ddp(session: Session, env: dict[str, Any], records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = {k: harness_row(v["finetune"]) if v["finetune"] else None for k, v in records.items()}
    one, two = rows.get("one"), rows.get("two")
    efficiency = _ratio(two and two["samples_per_s"], one and 2 * one["samples_per_s"])
    curve_diff = None
    if one and two and one["loss_curve"] and two["loss_curve"] and len(one["loss_curve"]) == len(two["loss_curve"]):
        curve_diff = max(abs(a - b) for a, b in zip(one["loss_curve"], two["loss_curve"], strict=True))
    summary = {"kind": "ddp", "mode": env["mode"], "git_revision": env["git_revision"], "env": env,
               "steps": session.steps, "one_device": one, "two_devices": two,
               "targets": [_target("scaling efficiency: samples/s on 2 GPUs / (2 x on 1 GPU), stage 3 batch 8/GPU",
                                   efficiency, THRESHOLDS["scaling_efficiency"]),
                           {"target": "loss curves, 1 vs 2 devices: largest absolute difference per optimizer step",
                            "value": curve_diff, "threshold": None, "direction": "report", "met": None}]}
    (session.out / "ddp_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (session.out / "ddp_summary.md").write_text(ddp_markdown(summary))
    pack_harness(session.out / "ddp-harness.tar.gz", [r["name"] for r in records.values()])
    return summary


def pack_harness(tarball: Path, names: list[str], extra: list[Path] = ()) -> None:
    """Small files only: measurements, generation records, configs, logs, benchmark TSVs, reports (no ckpts)."""
    keep = (".json", ".yaml", ".csv", ".log", ".tsv", ".html", ".png")
    with tarfile.open(tarball, "w:gz") as tar:
        for name in names:
            for base in (f"runs/{name}", f"logs/{name}", f"benchmarks/{name}", f"results/{name}", f"reports/{name}"):
                for path in sorted((ROOT / base).rglob("*")) if (ROOT / base).exists() else []:
                    if path.is_file() and path.suffix in keep:
                        tar.add(path, arcname=str(path.relative_to(ROOT)))
        for folder in extra:
            for path in sorted(folder.rglob("*")) if folder.exists() else []:
                if path.is_file() and path.suffix in keep:
                    tar.add(path, arcname=f"{folder.name}/{path.relative_to(folder)}")


# ------------------------------------------------------------------------------------------------ markdown


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def _targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = ["| target | value | threshold | met |", "| --- | --- | --- | --- |"]
    for t in targets:
        threshold = f"{t['direction']} {_fmt(t['threshold'])}" if t["threshold"] is not None else t["direction"]
        lines.append(f"| {t['target']} | {_fmt(t['value'])} | {threshold} | {_fmt(t['met'])} |")
    return lines


def single_markdown(s: dict[str, Any]) -> str:
    gpu = s["env"]["gpus"][0] if s["env"]["gpus"] else {}
    title = "Session" if s["kind"] == "single" else "Single-GPU rows measured by the DDP call after its DDP part"
    lines = [f"{title} of revision `{s['git_revision']}` (source digest `{s['env']['source_digest'][:16]}`), mode "
             f"{s['mode']}, device {gpu.get('name', 'CPU')} "
             f"(datasheet dense bf16 {_fmt(gpu.get('datasheet_bf16_dense_flops'))} FLOP/s, measured bf16 matmul "
             f"{_fmt(gpu.get('measured_bf16_matmul_flops'))} FLOP/s); configs {', '.join(s['configs'])}.", "",
             *_targets_table(s["targets"]), "",
             "| what | resampler | views | batch | samples/s | step ms | alloc GiB | MFU | MFU (measured peak) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["naive"]:
        if r.get("status") == "ok":
            lines.append(f"| naive step (stage {r['stage']}) | mlp | {r['views']} | {r['batch']} | "
                         f"{_fmt(r['samples_per_s'])} | {_fmt(1e3 * r['step_time_median_s'])} | "
                         f"{_fmt(r['peak_gpu_allocated_gib'])} | — | — |")
    for r in s["vlm_step"]:
        if r.get("status") == "ok":
            lines.append(f"| vlm_step.py {r['variant']} | {r['resampler']} | {r['views']} | {r['batch']} | "
                         f"{_fmt(r['samples_per_s'])} | {_fmt(r['step_ms'])} | {_fmt(r['alloc_gib'])} | "
                         f"{_fmt(r['mfu'])} | {_fmt(r['mfu_measured_peak'])} |")
    for r in s["harness"]:
        mode = "compiled" if r["compiled"] else "eager"
        lines.append(f"| harness stage {'3' if r['stage'] == 'finetune' else '2'} ({mode}) | {r['resampler']} | "
                     f"{r['views']} | {r['batch']} | {_fmt(r['samples_per_s'])} | "
                     f"{_fmt(r['step_time_median_s'] and 1e3 * r['step_time_median_s'])} | "
                     f"{_fmt(r['peak_gpu_allocated_gib'])} | {_fmt(r['mfu'])} | {_fmt(r['mfu_measured_peak'])} |")
    lines += ["", "| generation | batch | prefill s/sample | decode tokens/s | end-to-end tokens/s | static cache | "
              "compiled decode | LoRA merged | warm-up s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    plain = s.get("generation_plain")
    for r in s["generation"] + ([{**plain, "cell_id": f"{s['generation_plain_cell']}, plain path"}] if plain else []):
        lines.append(f"| {r['cell_id']} {r['stage']} | {r['batch_size']} | {_fmt(r['prefill_s_per_sample'])} | "
                     f"{_fmt(r['decode_tokens_per_s'])} | {_fmt(r['end_to_end_tokens_per_s'])} | "
                     f"{_fmt(r['static_cache'])} | {_fmt(r['compiled_decode'])} | {_fmt(r['lora_merged'])} | "
                     f"{_fmt(r['warmup_s'])} |")
    per_token = s["activation_mib_per_lm_token"]
    lines += ["", f"LM activation memory per LM token (9- minus 5-view peak, stage 3): {_fmt(per_token)} MiB "
                  "(the gradient-checkpointing rule's constant, benchmarks/README.md)."]
    same = s["fast_vs_plain_identical_predictions"]
    lines += ["", f"Fast-path captions identical to the plain path's: {_fmt(same and 100 * same, '.0f')} % of the "
                  "(image, query) groups.", "", "Steps: " + "; ".join(f"{x['step']} {x['status']} ({x['seconds']:.0f} s)"
                                                            for x in s["steps"]), ""]
    return "\n".join(lines)


def ddp_markdown(s: dict[str, Any]) -> str:
    lines = [f"DDP session of revision `{s['git_revision']}` (source digest `{s['env']['source_digest'][:16]}`), mode "
             f"{s['mode']}.", "", *_targets_table(s["targets"]),
             "", "| run | devices | batch/device | samples/s | step ms | alloc GiB | MFU |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in ("one_device", "two_devices"):
        r = s[key]
        if r:
            lines.append(f"| {r['cell_id']} | {r['devices']} | {r['batch']} | {_fmt(r['samples_per_s'])} | "
                         f"{_fmt(r['step_time_median_s'] and 1e3 * r['step_time_median_s'])} | "
                         f"{_fmt(r['peak_gpu_allocated_gib'])} | {_fmt(r['mfu'])} |")
    lines += ["", "Steps: " + "; ".join(f"{x['step']} {x['status']} ({x['seconds']:.0f} s)" for x in s["steps"]), ""]
    return "\n".join(lines)


def fill_readme(summary_md: Path, readme: Path, block: str) -> None:
    """Replace the README's placeholder block ``block`` (between its begin/end markers) by a session's summary."""
    begin, end = f"<!-- {block}-table:begin -->", f"<!-- {block}-table:end -->"
    text = readme.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{readme}: no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{summary_md.read_text(encoding='utf-8').strip()}\n{end}{tail}",
                      encoding="utf-8")


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("single", "ddp", "extras"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True, help="what comes back from the device (<= 8 files)")
        p.add_argument("--work", type=Path, default=None, help="intermediate files (default: a temporary folder)")
        p.add_argument("--cpu", action="store_true", help="the same steps at tiny dimensions on the CPU")
        p.add_argument("--deadline-epoch", type=float, default=None,
                       help="Unix time by which every step must have ended (default: 570 s from now)")
    sub.add_parser("digest", help="print the source digest a session records (compare with its env.json)")
    p = sub.add_parser("fill-readme")
    p.add_argument("--summary", type=Path, required=True)
    p.add_argument("--readme", type=Path, default=ROOT / "reports" / "gpu-speed" / "README.md")
    p.add_argument("--block", choices=["session", "ddp", "extras"], default="session",
                   help="which placeholder block: session (summary.md), ddp (ddp_summary.md), extras "
                        "(extras_summary.md)")
    args = ap.parse_args(argv)
    if args.command == "fill-readme":
        fill_readme(args.summary, args.readme, args.block)
        return 0
    if args.command == "digest":
        print(source_digest())
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-session-"))
    work.mkdir(parents=True, exist_ok=True)
    session = Session(args.out, work, args.cpu, args.deadline_epoch or time.time() + 570)
    runs: dict[str, Callable[[Session], dict[str, Any]]] = {
        "single": single, "ddp": ddp, "extras": lambda s: single(s, "extras")}
    summary = runs[args.command](session)
    steps = list(summary["steps"])
    shown = {"single": ["summary.md"], "ddp": ["ddp_summary.md", "extras_summary.md"], "extras": ["extras_summary.md"]}
    for name in shown[args.command]:
        if (args.out / name).is_file():
            print((args.out / name).read_text(), flush=True)
    if args.command == "ddp" and (args.out / "extras_summary.json").is_file():
        steps += json.loads((args.out / "extras_summary.json").read_text())["steps"]
    failed = [s for s in steps if s["status"] != "ok" and not s["status"].startswith("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
