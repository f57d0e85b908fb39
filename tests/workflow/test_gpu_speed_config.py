"""The GPU speed configs validate and resolve strictly; the naive reference step runs (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import torch
import yaml
from workflow_helpers import copy_workflow, run_snakemake, snakemake_env

from panobench import matrix as pm

ROOT = Path(__file__).resolve().parents[2]
LORA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def workflow_config(name: str) -> dict:
    """As Snakemake builds it: the Snakefile's config/config.yaml, updated by --configfile, then schema-checked."""
    base = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    wf = _merge(base, yaml.safe_load((ROOT / f"config/{name}.yaml").read_text()))
    schema = yaml.safe_load((ROOT / "config/schema.yaml").read_text())
    jsonschema.Draft202012Validator(schema).validate(wf)
    return wf


@pytest.mark.parametrize(("name", "batch"), [("gpu-speed", 8), ("gpu-speed-b1", 1)])
def test_speed_config_resolves_full_size_cells(name: str, batch: int) -> None:
    from panobench.models.backbones import FULL_LLM_ARCH, FULL_VISION_ARCH

    wf = workflow_config(name)
    runs = pm.experiments(wf)      # strict RunConfig resolution of every cell
    cells = pm.expand_cells(wf)
    assert len(cells) == 12 and set(runs) == {c.cell_id for c in cells}
    assert {c.overlap for c in cells} == {0.0, 0.25, 0.5}
    assert {c.resampler for c in cells} == {"mlp", "bimamba", "qformer", "perceiver"}
    for run in runs.values():
        assert run["vision"]["init"] == "random" and run["vision"]["arch"] == FULL_VISION_ARCH
        assert run["llm"]["init"] == "random" and run["llm"]["arch"] == FULL_LLM_ARCH
        assert run["lora"]["r"] == 32 and run["lora"]["target_modules"] == LORA_ALL
        assert run["runtime"]["precision"] == "bf16-mixed" and run["runtime"]["accelerator"] == "cuda"
        assert (run["data"]["erp_width"], run["data"]["erp_height"]) == (2048, 1024)
        for stage in pm.TRAIN_STAGES:
            assert run["stages"][stage]["batch_size"] == batch
            assert run["stages"][stage]["max_steps"] > run["runtime"]["measure_warmup_steps"]


def test_shipped_configs_are_fast_by_default() -> None:
    """quic360 and the speed configs: compiled, frozen weights in bf16 (bf16-mixed), no gradient checkpointing, the
    eval fast path at batch 32; quic360 keeps the seed guide's effective batch (1 x 4) as one micro-batch of 4."""
    for name, batch in (("quic360", 4), ("gpu-speed", 8)):
        for run in pm.experiments(workflow_config(name)).values():
            assert run["runtime"]["compile"] is True and run["runtime"]["precision"] == "bf16-mixed"
            assert run["eval"]["batch_size"] == 32 and run["eval"]["static_cache"] and run["eval"]["merge_lora"]
            assert run["eval"]["compile"] is None                  # follows runtime.compile
            for stage in ("resampler", "finetune"):
                s = run["stages"][stage]
                assert s["compile"] is None and not s["gradient_checkpointing"]
                assert (s["batch_size"], s["accumulate_grad_batches"]) == (batch, 1)


def _overlay(*names: str) -> dict:
    return pm.load_workflow([f"config/{n}.yaml" for n in names], ROOT)


def test_session_and_ddp_overlays_resolve() -> None:
    session = _overlay("gpu-speed", "gpu-speed-session")
    assert session["name"] == "gpu-speed" and session["eval_stages"] == ["finetune"]
    cells = pm.expand_cells(session)
    assert {(c.overlap, c.resampler) for c in cells} == {(o, r) for o in (0.0, 0.5)
                                                         for r in ("mlp", "bimamba", "qformer", "perceiver")}
    run = next(iter(pm.experiments(session).values()))
    assert run["stages"]["resampler"]["compile"] is False and run["stages"]["finetune"]["max_steps"] == 20
    two, one = _overlay("gpu-speed", "gpu-speed-ddp"), _overlay("gpu-speed", "gpu-speed-ddp-1gpu")
    runs = [next(iter(pm.experiments(wf).values())) for wf in (two, one)]
    assert [r["runtime"]["devices"] for r in runs] == [2, 1]
    for stage in ("resampler", "finetune"):
        # The same samples per optimizer step: batch x accumulation x devices.
        assert [r["stages"][stage]["batch_size"] * r["stages"][stage]["accumulate_grad_batches"]
                * r["runtime"]["devices"] for r in runs] == [16, 16]
    assert pm.expand_cells(two)[0].cell_id == pm.expand_cells(one)[0].cell_id and two["name"] != one["name"]


def test_batch_configs_write_to_different_reports() -> None:
    assert pm.report_dir(workflow_config("gpu-speed")) != pm.report_dir(workflow_config("gpu-speed-b1"))


def test_smoke_variant_resolves_with_the_same_structure() -> None:
    full, smoke = workflow_config("gpu-speed"), workflow_config("gpu-speed-smoke")
    runs = pm.experiments(smoke)
    assert len(runs) == len(pm.expand_cells(smoke)) == 2
    one = next(iter(runs.values()))
    assert one["runtime"]["accelerator"] == "cpu" and one["stages"]["finetune"]["max_steps"] == 2
    assert one["vision"]["init"] == one["llm"]["init"] == "random"
    assert set(one["vision"]["arch"]) == set(full["run"]["vision"]["arch"])
    assert set(one["llm"]["arch"]) == set(full["run"]["llm"]["arch"])
    assert one["prompt_instruction"] == full["run"]["prompt_instruction"]
    assert sorted(smoke["resampler_params"]) == sorted(full["resampler_params"])


def _naive_step_module():
    spec = importlib.util.spec_from_file_location("naive_step", ROOT / "benchmarks/naive_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_naive_step_runs_tiny_on_cpu(tmp_path: Path) -> None:
    naive = _naive_step_module()
    out = tmp_path / "naive.json"
    rc = naive.main(["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "0", "--batch", "1",
                     "--views", "2", "--text-len", "8", "--out", str(out)])
    record = json.loads(out.read_text())
    assert rc == 0 and record["tiny"] is True
    assert [(r["stage"], r["status"]) for r in record["results"]] == [(2, "ok"), (3, "ok")]
    stage2, stage3 = record["results"]
    assert stage3["trainable_params"] > stage2["trainable_params"]      # LoRA adds trainable weights
    for r in record["results"]:
        assert r["measured_steps"] == 2 and math.isfinite(r["loss_last"]) and r["samples_per_s"] > 0


def test_naive_and_target_only_losses_agree() -> None:
    naive = _naive_step_module()
    torch.manual_seed(0)
    model = naive.build(tiny=True, device=torch.device("cpu"))
    views = torch.randn(2, 3, 3, 32, 32)
    text = torch.randint(0, 512, (2, 8))
    with torch.no_grad():
        full = model(views, text, "naive")
        selected = model(views, text, "targets")
    torch.testing.assert_close(full, selected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.workflow
def test_smoke_variant_runs_through_the_workflow(tmp_path: Path) -> None:
    """The speed config's code path end to end on CPU: random-init backbones from `arch`, LoRA r32, generation
    speed measured, caption scoring skipped, report built."""
    wd = copy_workflow(tmp_path / "wf")
    run_snakemake(wd, "--cores", "2", "--configfile", "config/gpu-speed-smoke.yaml")
    smoke = workflow_config("gpu-speed-smoke")
    cells = pm.expand_cells(smoke)
    results = pd.read_csv(wd / "reports" / smoke["name"] / "results.csv")
    assert len(results) == 2 * len(cells) and (results["status"] == "ok").all(), results[["cell_id", "status"]]
    speed = ["step_time_median_s", "samples_per_s", "flops_per_step", "num_views", "visual_tokens_per_sample"]
    assert results[speed].notna().all().all(), results[speed]
    assert sorted(results["num_views"].unique()) == [5, 9]
    finetune = results[results["stage"] == "finetune"]
    assert finetune["gen_tokens_per_s"].gt(0).all(), finetune["gen_tokens_per_s"]
    assert finetune["CIDEr"].isna().all()                  # score: false — no Java, no metrics.json
    assert not list(wd.glob("runs/**/metrics.json"))
    assert (results["resampler"] == "bimamba").all()
    assert (results["kernel_path"] == "reference").all()   # CPU: the pure-PyTorch scan, recorded as such
    assert (wd / "reports" / smoke["name"] / "report.html").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ the GPU sessions
SESSION_FILES = ["env.json", "harness.tar.gz", "naive_step.json", "session.log", "summary.json", "summary.md",
                 "vlm_step.json"]
DDP_FILES = ["ddp-harness.tar.gz", "ddp-session.log", "ddp_summary.json", "ddp_summary.md", "env.json",
             "extras-harness.tar.gz", "extras_summary.json", "extras_summary.md"]


def _run_session(tmp_path: Path, script: str) -> tuple[Path, subprocess.CompletedProcess]:
    """A session script's CPU mode in a scratch copy of the workflow (the device call runs in the repo root)."""
    wd = copy_workflow(tmp_path / "wf")
    shutil.copytree(ROOT / "benchmarks", wd / "benchmarks", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    env = {**snakemake_env(), "OUT": str(out), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", f"benchmarks/device/{script}", "--cpu"], cwd=wd, env=env, capture_output=True,
                          text=True, timeout=1800)
    return out, proc


def _check_fits_the_device_tool(out: Path, expected: list[str]) -> None:
    """What comes back from a device call: at most 8 plain files, names of letters, digits, '.', '_', '-'."""
    names = sorted(p.name for p in out.iterdir())
    assert names == expected and all(p.is_file() for p in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names) and len(names) <= 8


@pytest.mark.slow
@pytest.mark.workflow
def test_single_gpu_session_cpu_mode(tmp_path: Path) -> None:
    """run_gpu_session.sh --cpu: every step of the GPU session (naive step, vlm_step.py, the harness through
    Snakemake with the targets the session derives, generation fast and plain, the report, the collection) at
    tiny dimensions; a wrong target, a renamed field or a None in a division fails here."""
    out, proc = _run_session(tmp_path, "run_gpu_session.sh")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    _check_fits_the_device_tool(out, SESSION_FILES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu" and summary["env"]["source_digest"]
    assert [s["status"] for s in summary["steps"]] == ["ok"] * len(summary["steps"])
    assert [s["step"].split()[0] for s in summary["steps"]] == [
        "naive", "prepare", "vlm_step.py", "harness", "harness", "generation", "vlm_step.py", "vlm_step.py",
        "generation", "report"]
    targets = summary["targets"]
    assert len(targets) == 6
    # Every ratio was computed (CPU: no GPU memory, no MFU); the thresholds are the issue's.
    for t in summary["targets"]:
        assert (t["value"] is None) == any(w in t["target"] for w in ("allocated", "MFU")), t
    assert [t["threshold"] for t in targets] == [3.0, 20.0, 1.15, 0.40, 1500.0, None]
    assert {(r["resampler"], r["views"], r["stage"]) for r in summary["harness"]} == {
        ("mlp", 5, "resampler"), ("mlp", 5, "finetune"), ("mlp", 9, "resampler"), ("mlp", 9, "finetune")}
    for row in summary["harness"]:
        assert row["samples_per_s"] > 0 and row["flops_per_step"] > 0 and row["mfu"] is None
        assert row["compiled"] is (row["stage"] == "finetune")
    assert {(r["variant"], r["resampler"], r["views"]) for r in summary["vlm_step"]} == {
        ("compile", "mlp", 5), ("compile", "mlp", 9), ("compile", "bimamba", 5)}
    assert all(r["status"] == "ok" and r["flops_per_step"] > 0 for r in summary["vlm_step"])
    gen = summary["generation"][0]
    assert gen["static_cache"] and gen["compiled_decode"] and gen["lora_merged"] and gen["decode_tokens_per_s"] > 0
    plain = summary["generation_plain"]
    assert not plain["static_cache"] and not plain["compiled_decode"] and plain["lora_merged"] is False
    assert summary["fast_vs_plain_identical_predictions"] == 1.0
    assert summary["activation_mib_per_lm_token"] is None          # no GPU memory on a CPU
    with tarfile.open(out / "harness.tar.gz") as tar:
        names = tar.getnames()
    assert any(n.endswith("finetune/anyres-e2p_mlp/measurements.json") for n in names)
    assert "plain-generation/generation.json" in names and any(n.endswith("report.html") for n in names)
    assert not any(n.endswith(".ckpt") for n in names)
    # The collection replaces the README's session block with summary.md, unedited, and leaves the other blocks.
    readme = tmp_path / "README.md"
    shutil.copy(ROOT / "reports/gpu-speed/README.md", readme)
    before = readme.read_text()
    subprocess.run([sys.executable, str(ROOT / "benchmarks/device/gpu_session.py"), "fill-readme", "--summary",
                    str(out / "summary.md"), "--readme", str(readme)], check=True)
    filled = readme.read_text()

    def block(text: str, name: str) -> str:
        return text.split(f"<!-- {name}-table:begin -->", 1)[1].split(f"<!-- {name}-table:end -->", 1)[0]

    assert block(filled, "session").strip() == (out / "summary.md").read_text().strip()
    assert block(filled, "session") != block(before, "session")
    for other in ("ddp", "extras"):
        assert block(filled, other) == block(before, other)
    assert filled.split("<!-- session-table:begin -->")[0] == before.split("<!-- session-table:begin -->")[0]


@pytest.mark.slow
@pytest.mark.workflow
def test_ddp_session_cpu_mode(tmp_path: Path) -> None:
    """run_ddp_session.sh --cpu: the DDP measurement on two gloo processes, then the extras. One device at batch 2 x
    accumulation 2 and two devices at batch 2 each see the same samples per optimizer step: the loss curves agree,
    samples/s are counted over both ranks, rank 0 alone writes the records."""
    out, proc = _run_session(tmp_path, "run_ddp_session.sh")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    _check_fits_the_device_tool(out, DDP_FILES)
    summary = json.loads((out / "ddp_summary.json").read_text())
    one, two = summary["one_device"], summary["two_devices"]
    assert (one["devices"], two["devices"]) == (1, 2) and one["batch"] == two["batch"]
    assert two["samples_per_s"] == pytest.approx(2 * two["batch"] / two["step_time_median_s"])
    efficiency, curves = summary["targets"]
    assert efficiency["value"] > 0 and efficiency["threshold"] == 0.9
    assert len(one["loss_curve"]) == len(two["loss_curve"]) > 0
    assert curves["value"] < 0.02, (one["loss_curve"], two["loss_curve"])   # same samples and weights per step
    with tarfile.open(out / "ddp-harness.tar.gz") as tar:
        measurements = [n for n in tar.getnames() if n.endswith("measurements.json")]
    assert len(measurements) == 4                                # 2 stages x 2 runs, each written once
    # The time left goes to single-GPU rows (CPU mode: bimamba at 5 views, with the plain-path comparison).
    extras = json.loads((out / "extras_summary.json").read_text())
    assert extras["kind"] == "extras" and all(s["status"] == "ok" for s in extras["steps"]), extras["steps"]
    assert {(r["resampler"], r["views"], r["stage"]) for r in extras["harness"]} == {
        ("bimamba", 5, "resampler"), ("bimamba", 5, "finetune")}
    assert {(r["resampler"], r["views"]) for r in extras["vlm_step"]} == {("bimamba", 5), ("mlp", 9)}
    assert extras["generation"][0]["decode_tokens_per_s"] > 0 and extras["fast_vs_plain_identical_predictions"] == 1.0
