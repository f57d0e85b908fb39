"""The GPU speed configs validate and resolve strictly; the naive reference step runs (tiny, CPU)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jsonschema
import pandas as pd
import pytest
import torch
import yaml
from workflow_helpers import copy_workflow, run_snakemake

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
