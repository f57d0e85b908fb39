"""The GPU-only branches of benchmarks/device/gpu_session.py, on a CPU: the environment record of a (faked) GPU and
the collection of GPU-like records (numbers where the CPU mode has nulls), so neither first runs on a lent GPU."""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def session_module():
    spec = importlib.util.spec_from_file_location("gpu_session", ROOT / "benchmarks/device/gpu_session.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_environment_of_a_gpu(session_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import panobench.measurement.throughput as throughput

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "device", lambda i: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(throughput, "measure_bf16_matmul_peak", lambda device: 790e12)
    session = session_module.Session(tmp_path, tmp_path, cpu=False, deadline=1e12)
    env = session_module.environment(session)
    assert env == json.loads((tmp_path / "env.json").read_text())
    assert [g["name"] for g in env["gpus"]] == ["NVIDIA H200"] * 2
    assert env["gpus"][0]["datasheet_bf16_dense_flops"] == 989e12 and env["gpus"][1]["measured_bf16_matmul_flops"]
    assert env["mode"] == "gpu" and len(env["source_digest"]) == 64


def _harness_record(resampler: str, views: int, stage: str, alloc: float, sps: float) -> dict:
    return {"cell_id": f"ov{0.0 if views == 5 else 0.5:.2f}_fov90_{resampler}_vis-random-init_seed0", "stage": stage,
            "knobs": {"resampler": resampler}, "geometry": {"num_views": views},
            "speed": {"batch_size": 8, "devices": 1, "step_time_median_s": 8 / sps, "samples_per_s": sps},
            "memory": {"peak_gpu_allocated_gib": alloc, "peak_gpu_reserved_gib": alloc + 2},
            "cost": {"flops_per_step": 3.5e13, "mfu": 0.42, "mfu_measured_peak": 0.53, "device_peak_flops": 989e12},
            "tokens": {"visual_tokens_per_sample": views * 256, "text_tokens_per_sample": 126.0},
            "kernel_path": "mamba_ssm" if resampler == "bimamba" else "torch", "loss": {"curve": [6.0, 5.9]},
            "resolved_config": {"stages": {stage: {"compile": None, "gradient_checkpointing": False}},
                                "runtime": {"compile": True}}}


def test_collection_of_gpu_records(session_module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Numbers everywhere the CPU mode has nulls: the targets, the GC rule's constant and the markdown."""
    from panobench import matrix as pm

    root = tmp_path / "repo"
    monkeypatch.setattr(session_module, "ROOT", root)
    wf = pm.load_workflow(session_module.SESSION_CONFIGS, ROOT)
    cells = session_module.session_cells(wf)
    for cell in cells:
        views = session_module.VIEWS[cell.overlap]
        for stage in pm.TRAIN_STAGES:
            path = root / pm.stage_dir(wf, cell.cell_id, stage, cell.resampler) / "measurements.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(_harness_record(cell.resampler, views, stage, 4.0 + 0.012 * views * 256,
                                                       75.0 if views == 5 else 40.0)))
    gen = root / pm.eval_dir(wf, cells[0].cell_id, "finetune") / "generation.json"
    gen.parent.mkdir(parents=True)
    gen.write_text(json.dumps({"stage": "finetune", "batch_size": 32, "prefill_s_per_sample": 0.004,
                               "decode_tokens_per_s": 2100.0, "end_to_end_tokens_per_s": 900.0, "static_cache": True,
                               "compiled_decode": True, "lora_merged": True, "warmup_s": 48.0}))
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    (out / "naive_step.json").write_text(json.dumps({"results": [
        {"stage": 3, "views": 5, "batch": 8, "status": "ok", "samples_per_s": 23.0, "step_time_median_s": 0.35,
         "peak_gpu_allocated_gib": 45.8}]}))
    (work / "vlm_step-a.json").write_text(json.dumps({"device": "cuda", "rows": [
        {"variant": "compile", "resampler": "mlp", "views": 5, "batch": 8, "status": "ok", "samples_per_s": 80.0,
         "step_ms": 100.0, "alloc_gib": 15.0, "mfu": 0.44, "mfu_measured_peak": 0.55}], "profiles": {"x": "table"}}))
    session = session_module.Session(out, work, cpu=False, deadline=1e12)
    env = {"mode": "gpu", "git_revision": "abc", "source_digest": "0" * 64,
           "gpus": [{"name": "NVIDIA H200", "datasheet_bf16_dense_flops": 989e12, "measured_bf16_matmul_flops": 7.9e14}]}
    summary = session_module.collect_single(session, wf, env, cells, ["config/gpu-speed.yaml"], "single", None)
    values = [t["value"] for t in summary["targets"]]
    assert values[0] == pytest.approx(75.0 / 23.0) and values[2] == pytest.approx(80.0 / 75.0)
    assert values[1] == pytest.approx(4.0 + 0.012 * 5 * 256) and values[3] == 0.42 and values[4] == 2100.0
    assert [t["met"] for t in summary["targets"]] == [True, True, True, True, True, True]
    # 9- minus 5-view peak over the extra LM tokens of the batch: the GC rule's constant.
    assert summary["activation_mib_per_lm_token"] == pytest.approx(1024 * 0.012 * 4 * 256 / (8 * 4 * 256))
    markdown = (out / "summary.md").read_text()
    assert "| harness stage 3 (compiled) | bimamba | 9 | 8 | 40 |" in markdown and "NVIDIA H200" in markdown
    assert json.loads((out / "vlm_step.json").read_text())["profiles"] == {"x": "table"}
    assert sorted(p.name for p in out.iterdir()) == ["harness.tar.gz", "naive_step.json", "summary.json",
                                                     "summary.md", "vlm_step.json"]
