"""The GPU-hour bill: measured job times and the projected cost of another config's matrix (reporting/bill.py)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fixtures_records import (
    GEN_BENCH_S,
    GEN_SECONDS_PER_SAMPLE,
    SCORE_BENCH_S,
    TRAIN_SCHEDULE,
    bench_s,
    measurements,
    workflow_config,
    write_records,
)

from panobench.cli import main as cli_main
from panobench.reporting.aggregate import aggregate, read_results
from panobench.reporting.bill import HOUR, measured_by_rule, project_matrix, read_measured

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 cells (2 overlaps x mlp/qformer x 2 seeds), all measured; no stage-1 recipe."""
    root = tmp_path_factory.mktemp("measured")
    manifest = write_records(root, overlaps=(0.0, 0.5), resamplers=("mlp", "qformer"), seeds=SEEDS)
    out = root / "reports" / "results.csv"
    aggregate(manifest, out, root=root)
    return out


def _target(tmp_path: Path, *, resamplers=("mlp", "qformer"), batch: int = 8) -> tuple[dict, Path]:
    """A 12-cell target: 2 overlaps x resamplers x 3 seeds, its own schedule, 3 eval stages."""
    wf = workflow_config("target", (0.0, 0.5), resamplers, (0, 1, 2), ({"name": "pretrained"},))
    wf["run"]["stages"] = {"resampler": {"max_steps": 100, "batch_size": batch, "accumulate_grad_batches": 2},
                           "finetune": {"max_steps": 200, "batch_size": batch}}
    wf["eval_stages"] = ["baseline", "finetune", "blind"]
    path = tmp_path / "target.yaml"
    path.write_text(yaml.safe_dump(wf))
    return wf, path


def _measured_step_and_overhead(stage: str, resampler: str, overlap: float) -> tuple[float, float]:
    """Median step time and median non-step time (bench_s − projected, at least 0) of the fabricated cells."""
    steps, accum = TRAIN_SCHEDULE[stage]
    times = [measurements({"overlap": overlap, "fov": 90.0, "resampler": resampler, "vision_checkpoint": "pretrained",
                           "seed": s}, stage, "x", "cuda")["speed"]["step_time_median_s"] for s in SEEDS]
    return statistics.median(times), statistics.median(max(0.0, bench_s(stage) - t * steps * accum) for t in times)


def test_measured_bill_counts_every_job_once(measured):
    _, _, jobs = read_measured(measured)
    by_rule = measured_by_rule(jobs).set_index("rule")
    assert by_rule.loc["train_resampler", "jobs"] == 8 and by_rule.loc["generate", "jobs"] == 8
    gpu_s = 8 * (bench_s("resampler") + bench_s("finetune") + GEN_BENCH_S)
    assert by_rule["gpu_hours"].sum() == pytest.approx(gpu_s / HOUR)
    assert by_rule.loc["score", "gpu_hours"] == 0 and by_rule.loc["score", "wall_hours"] == SCORE_BENCH_S / HOUR
    results = read_results(measured)
    assert by_rule.loc["train_finetune", "projected_train_hours"] == pytest.approx(
        results.loc[results["stage"] == "finetune", "projected_train_s"].sum() / HOUR)


def test_projection_scales_measured_step_times_by_the_target_schedule(measured, tmp_path):
    wf, _ = _target(tmp_path)
    results, recipes, _ = read_measured(measured)
    projection = project_matrix(results, recipes, wf, test_samples=500)
    assert projection.missing == []
    jobs = projection.jobs.set_index(["rule", "target"])
    step, overhead = _measured_step_and_overhead("resampler", "qformer", 0.5)
    row = jobs.loc[("train_resampler", "ov0.50_fov90_qformer_vis-pretrained_seed2")]
    assert (row["num_views"], row["units"], row["matched"]) == (9, 100 * 2, 2)
    assert row["unit_s"] == pytest.approx(step)
    assert row["projected_s"] == pytest.approx(100 * 2 * step + overhead)
    step, overhead = _measured_step_and_overhead("finetune", "mlp", 0.0)
    row = jobs.loc[("train_finetune", "ov0.00_fov90_mlp_vis-pretrained_seed0")]
    assert row["projected_s"] == pytest.approx(200 * 1 * step + overhead)
    # generation: 3 eval stages x (500 samples x 0.02 s + start-up per stage (30 s − 4 x 60 x 0.02 s) / 4)
    startup = (GEN_BENCH_S - 4 * 60 * GEN_SECONDS_PER_SAMPLE) / 4
    gen = jobs.loc[("generate", "ov0.50_fov90_mlp_vis-pretrained_seed1")]
    assert gen["projected_s"] == pytest.approx(3 * (500 * GEN_SECONDS_PER_SAMPLE + startup))
    assert gen["projected_s"] == pytest.approx(48.9)
    counts = projection.by_rule().set_index("rule")["jobs"].to_dict()
    assert counts == {"train_resampler": 12, "train_finetune": 12, "generate": 12}
    assert projection.gpu_hours == pytest.approx(projection.jobs["projected_s"].sum() / HOUR)


def test_unmeasured_arm_and_batch_are_listed_not_guessed(measured, tmp_path):
    results, recipes, _ = read_measured(measured)
    wf, _ = _target(tmp_path, resamplers=("mlp", "perceiver"))
    projection = project_matrix(results, recipes, wf, test_samples=10)
    assert set(projection.jobs["resampler"]) == {"mlp"}
    assert any(line.startswith("3 job(s) train_finetune: no measured finetune step with resampler perceiver, 9 views")
               for line in projection.missing)
    assert any("generate: no measured generate job with resampler perceiver" in line for line in projection.missing)

    wf, _ = _target(tmp_path, batch=4)
    assert project_matrix(results, recipes, wf).jobs["rule"].eq("generate").all()   # no batch-4 step measured
    scaled = project_matrix(results, recipes, wf, scale_batch=True)
    step, overhead = _measured_step_and_overhead("finetune", "qformer", 0.0)
    row = scaled.jobs.set_index(["rule", "target"]).loc[("train_finetune", "ov0.00_fov90_qformer_vis-pretrained_seed0")]
    assert row["unit_s"] == pytest.approx(step * 4 / 8)
    assert any("--scale-batch" in note for note in scaled.notes)


def test_bill_cli(measured, tmp_path, capsys):
    _, config = _target(tmp_path)
    out = tmp_path / "projected.csv"
    assert cli_main(["bill", "--results", str(measured), "--config", str(config), "--test-samples", "500",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "GPU-hours measured: 0.128" in text            # 8 x (12.5 + 15 + 30) s
    projected = pd.read_csv(out)
    assert len(projected) == 36 and f"GPU-hours projected: {projected['gpu_s'].sum() / HOUR:.3f}" in text
    assert cli_main(["bill", "--results", str(measured), "--config", str(config), "--budget-hours", "0.01"]) == 1
    assert "OVER" in capsys.readouterr().out
    (tmp_path / "p").mkdir()
    _, perceiver = _target(tmp_path / "p", resamplers=("perceiver",))
    assert cli_main(["bill", "--results", str(measured), "--config", str(perceiver)]) == 1
    assert "not projected:" in capsys.readouterr().out
    assert cli_main(["bill", "--results", str(tmp_path / "nope.csv")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    assert cli_main(["bill", "--results", str(measured), "--config", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
