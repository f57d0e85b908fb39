"""Aggregation (results.csv) and the HTML report, on fabricated records of a small matrix."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_records import (
    FINGERPRINT,
    GEN_BENCH_S,
    GEN_SECONDS_PER_SAMPLE,
    SCORE_BENCH_S,
    TRAIN_SCHEDULE,
    bench_s,
    caption_metrics,
    measurements,
    write_records,
)
from PIL import Image
from scipy import stats

from panobench.cli import main as cli_main
from panobench.errors import InputError
from panobench.reporting.aggregate import (
    JOB_COLUMNS,
    RESULT_COLUMNS,
    RUN_MEASUREMENT_COLUMNS,
    VISION_RECIPE_COLUMNS,
    aggregate,
    log_error_line,
)
from panobench.reporting.html import build_report, parse_tiles
from panobench.reporting.plots import pareto_front
from panobench.reporting.tables import ci95_halfwidth, headline_table, resampler_order

FAILED_CELL = "ov0.50_fov90_qformer_vis-pretrained_seed1"
HOSTILE = "<script>alert('x')</script>"
FAIL_LOG = ("INFO loading data\nTraceback (most recent call last):\n  ValueError: bad\n"
            f"panobench train: error: image not found: data/pano_0007.png {HOSTILE}\n")
IMG_TAG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """2 overlaps x 2 resamplers x 2 seeds on GPU records, one cell failed in stage resampler; report built."""
    root = tmp_path_factory.mktemp("run")
    manifest = write_records(root, vision=({"name": "pretrained"}, {"name": "vic", "train": {
        "overlap": 0.5, "resampler": "mlp"}}), failures={FAILED_CELL: ("resampler", FAIL_LOG)})
    # Keep the report small: only the pretrained vision checkpoint takes part in the matrix under test.
    man = json.loads(manifest.read_text())
    man["cells"] = [c for c in man["cells"] if c["knobs"]["vision_checkpoint"] == "pretrained"]
    manifest.write_text(json.dumps(man))
    tile = root / "tiles_ov0.50.png"
    Image.new("RGB", (64, 32), (10, 200, 30)).save(tile)
    out_csv = root / "reports" / "bench" / "results.csv"
    df = aggregate(manifest, out_csv, root=root)
    html = build_report(out_csv, manifest, out_csv.parent, tiles={0.5: tile}, root=root)
    return {"root": root, "manifest": manifest, "df": df, "csv": out_csv, "html": html, "man": man}


def _row(df: pd.DataFrame, cell: str, stage: str) -> pd.Series:
    rows = df[(df["cell_id"] == cell) & (df["stage"] == stage)]
    assert len(rows) == 1
    return rows.iloc[0]


# ------------------------------------------------------------------------------------------ aggregate


def test_one_row_per_cell_and_stage_with_fixed_columns(matrix):
    df = pd.read_csv(matrix["csv"])
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert len(df) == 8 * 2
    assert set(zip(df["cell_id"], df["stage"], strict=True)) == {
        (c["cell_id"], s) for c in matrix["man"]["cells"] for s in ("resampler", "finetune")}


def test_run_measurement_columns_are_result_columns_and_no_experiment_columns():
    """The columns reproduction checks may let differ are real columns, and none of them is a knob, a caption metric,
    a token count or the data fingerprint (a check that ignored those would prove nothing)."""
    assert set(RUN_MEASUREMENT_COLUMNS) <= set(RESULT_COLUMNS)
    experiment = {"cell_id", "overlap", "resampler", "seed", "stage", "status", "num_views", "CIDEr", "blind_CIDEr",
                  "baseline_CIDEr", "visual_tokens_per_sample", "flops_per_step", "loss_best_val", "data_fingerprint"}
    assert not experiment & set(RUN_MEASUREMENT_COLUMNS)


def test_failed_cell_has_status_and_log_error_line(matrix):
    df = matrix["df"]
    row = _row(df, FAILED_CELL, "resampler")
    assert row["status"] == "failed"
    assert row["error"] == f"panobench train: error: image not found: data/pano_0007.png {HOSTILE}"
    assert math.isnan(row["CIDEr"]) and math.isnan(row["samples_per_s"])
    downstream = _row(df, FAILED_CELL, "finetune")
    assert downstream["status"] == "failed" and "earlier stage" in downstream["error"]
    assert (df[df["cell_id"] != FAILED_CELL]["status"] == "ok").all()


def test_deltas_and_baseline(matrix):
    df = matrix["df"]
    cell = "ov0.50_fov90_mlp_vis-pretrained_seed1"
    row = _row(df, cell, "finetune")
    knobs = {"overlap": 0.5, "resampler": "mlp", "seed": 1, "vision_checkpoint": "pretrained"}
    trained, base = caption_metrics(knobs, "finetune"), caption_metrics(knobs, "baseline")
    for metric in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
        assert row[metric] == pytest.approx(trained[metric])
        assert row[f"baseline_{metric}"] == pytest.approx(base[metric])
        assert row[f"delta_{metric}"] == pytest.approx(trained[metric] - base[metric])
    assert math.isnan(row["SPICE"]) and math.isnan(row["delta_SPICE"])   # null in the record -> NaN
    # The failed cell still has its baseline (it was evaluated) but no delta.
    failed = _row(df, FAILED_CELL, "finetune")
    assert failed["baseline_CIDEr"] == pytest.approx(0.02) and math.isnan(failed["delta_CIDEr"])


def test_measurements_benchmark_and_provenance_columns(matrix):
    row = _row(matrix["df"], "ov0.50_fov90_mlp_vis-pretrained_seed0", "resampler")
    assert row["num_views"] == 9 and row["visual_tokens_per_sample"] == 9 * 16
    assert row["vision_tokens_per_view"] == 64 and row["resampled_tokens_per_view"] == 16
    assert row["bench_s"] == pytest.approx(12.5) and row["bench_max_rss_mb"] == pytest.approx(2048.5)
    assert row["peak_gpu_allocated_gib"] == pytest.approx(36.0)
    assert row["device"] == "NVIDIA H200" and row["version_torch"] == "2.13.0" and len(row["config_hash"]) == 16
    assert json.loads(row["decoding"]) == {"do_sample": False, "max_new_tokens": 40, "num_beams": 1}
    assert row["data_fingerprint"] == FINGERPRINT and row["data_num_images"] == 40
    assert row["batch_size"] == 8 and row["devices"] == 1 and row["trainable_without_grad"] == 0


def test_best_validation_loss_columns(matrix):
    row = _row(matrix["df"], "ov0.50_fov90_mlp_vis-pretrained_seed0", "finetune")
    assert (row["loss_best_val"], row["loss_best_val_step"], row["loss_last_val"]) == (1.3, 30, 1.35)


def test_blind_columns_only_on_the_stage_it_captions_with(matrix):
    df = matrix["df"]
    cell = "ov0.00_fov90_qformer_vis-pretrained_seed1"
    knobs = {"overlap": 0.0, "resampler": "qformer", "seed": 1, "vision_checkpoint": "pretrained"}
    trained, blind = caption_metrics(knobs, "finetune"), caption_metrics(knobs, "blind")
    row = _row(df, cell, "finetune")
    for metric in ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L"):
        assert row[f"blind_{metric}"] == pytest.approx(blind[metric])
        assert row[f"delta_blind_{metric}"] == pytest.approx(trained[metric] - blind[metric])
    # the blind eval captions with the finetune checkpoint: the stage-2 row has nothing to compare with
    stage2 = _row(df, cell, "resampler")
    assert math.isnan(stage2["blind_CIDEr"]) and math.isnan(stage2["delta_blind_CIDEr"])
    assert math.isnan(_row(df, FAILED_CELL, "finetune")["blind_CIDEr"])


def test_schedule_and_generate_job_columns(matrix):
    df = matrix["df"]
    cell = "ov0.50_fov90_qformer_vis-pretrained_seed0"
    knobs = {"overlap": 0.5, "fov": 90.0, "resampler": "qformer", "vision_checkpoint": "pretrained", "seed": 0}
    for stage in ("resampler", "finetune"):
        row = _row(df, cell, stage)
        steps, accum = TRAIN_SCHEDULE[stage]
        step = measurements(knobs, stage, cell, "cuda")["speed"]["step_time_median_s"]
        assert (row["configured_steps"], row["accumulate_grad_batches"]) == (steps, accum)
        assert row["projected_train_s"] == pytest.approx(step * steps * accum)
        assert row["bench_s"] == bench_s(stage)
        # the cell's one generate job (4 eval stages x 60 samples), repeated on both rows of the cell
        assert row["gen_bench_s"] == GEN_BENCH_S and row["gen_job_stages"] == 4 and row["gen_job_samples"] == 240
        assert row["gen_job_seconds"] == pytest.approx(240 * GEN_SECONDS_PER_SAMPLE)
    assert math.isnan(_row(df, FAILED_CELL, "finetune")["gen_bench_s"])   # its generate job never ran


def test_jobs_table_counts_each_job_once(matrix):
    jobs = pd.read_csv(matrix["csv"].with_name("jobs.csv"))
    assert list(jobs.columns) == list(JOB_COLUMNS)
    counts = jobs["rule"].value_counts().to_dict()
    assert counts == {"train_vision": 1, "train_resampler": 8, "train_finetune": 8, "generate": 8, "score": 1}
    assert jobs.loc[jobs["rule"] == "score", "bench_s"].item() == SCORE_BENCH_S
    assert not jobs.loc[jobs["rule"] == "score", "gpu"].item() and jobs.loc[jobs["rule"] != "score", "gpu"].all()
    generate = jobs[jobs["rule"] == "generate"].set_index("target")
    assert generate.loc[FAILED_CELL, "status"] == "not run" and math.isnan(generate.loc[FAILED_CELL, "bench_s"])
    assert (generate.drop(FAILED_CELL)["bench_s"] == GEN_BENCH_S).all()
    # 7 cells x (resampler + finetune) + the failed cell's nothing + the stage-1 recipe, all measured
    train = jobs[jobs["rule"].str.startswith("train_")]
    assert train["bench_s"].sum() == pytest.approx(7 * (bench_s("resampler") + bench_s("finetune")) + bench_s("vision"))


def test_vision_recipes_table(matrix):
    recipes = pd.read_csv(matrix["csv"].with_name("vision_recipes.csv"))
    assert list(recipes.columns) == list(VISION_RECIPE_COLUMNS)
    assert recipes["recipe_id"].tolist() == ["vision-vic"] and recipes["status"].tolist() == ["ok"]
    assert recipes["samples_per_s"].iloc[0] > 0
    assert recipes["bench_s"].iloc[0] == bench_s("vision")
    assert recipes["configured_steps"].iloc[0] == TRAIN_SCHEDULE["vision"][0]


def test_ci_over_two_seeds(matrix):
    table = headline_table(matrix["df"])
    row = table[(table["resampler"] == "mlp") & (table["overlap"] == 0.0)].iloc[0]
    a, b = (caption_metrics({"overlap": 0.0, "resampler": "mlp", "seed": s, "vision_checkpoint": "pretrained"},
                            "finetune")["CIDEr"] for s in (0, 1))
    assert row["n_seeds"] == 2
    assert row["CIDEr_mean"] == pytest.approx((a + b) / 2)
    assert row["CIDEr_ci"] == pytest.approx(stats.t.ppf(0.975, 1) * abs(a - b) / 2)
    # The failed cell's group has one seed left: a mean but no CI.
    lone = table[(table["resampler"] == "qformer") & (table["overlap"] == 0.5)].iloc[0]
    assert lone["n_seeds"] == 1 and math.isnan(lone["CIDEr_ci"])


def test_log_error_line_prefers_last_error(tmp_path):
    log = tmp_path / "job.log"
    log.write_text("error: first\nINFO something\npanobench score: error: second\nINFO trailing\n")
    assert log_error_line(log) == "panobench score: error: second"
    log.write_text("INFO a\nKilled\n")
    assert log_error_line(log) is None
    assert log_error_line(tmp_path / "absent.log") is None


def test_missing_eval_without_log_names_the_file(tmp_path):
    manifest = write_records(tmp_path, overlaps=(0.5,), resamplers=("mlp",), seeds=(0,))
    man = json.loads(manifest.read_text())
    metrics = tmp_path / man["cells"][0]["evals"]["finetune"]["metrics"]
    metrics.unlink()
    df = aggregate(manifest, tmp_path / "out.csv", root=tmp_path)
    row = _row(df, man["cells"][0]["cell_id"], "finetune")
    assert row["status"] == "failed" and row["error"] == f"missing {metrics}"
    assert _row(df, man["cells"][0]["cell_id"], "resampler")["status"] == "ok"


def test_unreadable_or_incomplete_measurements_fail_the_stage(tmp_path):
    manifest = write_records(tmp_path, overlaps=(0.0, 0.5), resamplers=("mlp",), seeds=(0,))
    man = json.loads(manifest.read_text())
    corrupt = tmp_path / man["cells"][0]["stages"]["finetune"]["measurements"]
    corrupt.write_text('{"cell_id": ')
    partial = tmp_path / man["cells"][1]["stages"]["resampler"]["measurements"]
    partial.write_text(json.dumps({**json.loads(partial.read_text()), "status": "interrupted"}))
    (tmp_path / man["cells"][1]["stages"]["resampler"]["log"]).unlink()
    df = aggregate(manifest, tmp_path / "out.csv", root=tmp_path)
    bad = _row(df, man["cells"][0]["cell_id"], "finetune")
    assert bad["status"] == "failed" and bad["error"].startswith(f"unreadable {corrupt}")
    assert bad["error"].endswith("ends: INFO done")
    interrupted = _row(df, man["cells"][1]["cell_id"], "resampler")
    assert interrupted["status"] == "failed" and "status 'interrupted'" in interrupted["error"]


def test_missing_manifest_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="manifest"):
        aggregate(tmp_path / "nope.json", tmp_path / "out.csv")


# ------------------------------------------------------------------------------------------ report


def test_report_is_self_contained_and_embeds_every_figure(matrix):
    html = matrix["html"].read_text()
    figures = sorted((matrix["csv"].parent / "figures").glob("*.png"))
    assert len(figures) >= 5
    assert html.count(IMG_TAG) >= len(figures) + 1          # + the tiling contact sheet
    assert 'src="http' not in html and "href=\"http" not in html
    # every src/href is a data URI or an in-page anchor: nothing outside the file is needed
    for attr in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert attr.startswith(("data:image/png;base64,", "#")), attr
    assert "<link" not in html and "<script" not in html


def test_report_lists_failed_cell_and_escapes_error(matrix):
    html = matrix["html"].read_text()
    assert FAILED_CELL in html
    assert HOSTILE not in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html
    assert 'id="failed-alert"' in html


def test_report_sections_and_highlight(matrix):
    html = matrix["html"].read_text()
    for section in ("summary", "headline", "paired", "method", "image", "figures", "bill", "tiling", "failed",
                    "results", "provenance", "decoding", "vision"):
        assert f'id="{section}"' in html
    assert 'class="best"' in html
    assert "peak GPU memory allocated (GiB)" in html
    assert "± " in html                                    # CIs shown for 2 seeds
    assert "cell_id: ov0.00_fov90_mlp_vis-pretrained_seed0" in html   # the resolved config YAML
    assert "vision-vic" in html
    assert "0123456789abcdef0123456789abcdef01234567" in html
    assert FINGERPRINT[:12] + "…" in html and FINGERPRINT in html      # provenance short form, summary full
    assert 'id="budget-alert"' not in html and 'id="data-alert"' not in html
    paired_table = html.split('id="paired"')[1].split("<figure")[0]    # the summary table, not the breakdown
    assert "one seed" not in paired_table and "n=2" in paired_table
    assert "image helps" in html                                       # fixture blind CIDEr is far below trained
    assert 'id="fig-paired_differences"' in html and 'id="fig-image_effect"' in html
    for heading in ("tokens / view", "visual tokens / sample"):
        assert f"<th>{heading}</th>" in html


def test_report_sections_in_order(matrix):
    html = matrix["html"].read_text()
    order = ["summary", "headline", "paired", "image", "figures", "bill", "tiling", "failed", "results",
             "provenance", "decoding", "vision"]
    positions = [html.index(f'<h2 id="{section}"') for section in order]
    assert positions == sorted(positions)


def test_cpu_only_single_seed_single_overlap(tmp_path):
    manifest = write_records(tmp_path, overlaps=(0.5,), resamplers=("perceiver", "mlp"), seeds=(0,),
                             device_type="cpu")
    out_csv = tmp_path / "rep" / "results.csv"
    df = aggregate(manifest, out_csv, root=tmp_path)
    assert df["peak_gpu_allocated_gib"].isna().all() and (df["status"] == "ok").all()
    html = build_report(out_csv, manifest, out_csv.parent, root=tmp_path, title="cpu run").read_text()
    assert "peak host RSS (GiB)" in html and "peak GPU memory" not in html
    assert "± " not in html.split('id="headline"')[1].split('id="paired"')[0]   # one seed: no CIs
    paired = html.split('id="paired"')[1].split('id="image"')[0]
    assert "One seed: nothing in this section is testable" in paired and "one seed: not testable" in paired
    assert " [" not in paired.split("<table")[1]            # no intervals in the paired table
    assert html.count(IMG_TAG) == len(list((out_csv.parent / "figures").glob("*.png")))
    assert (out_csv.parent / "results.csv").is_file()      # building the report leaves the table in place
    # headline rows follow the fixed resampler order, whatever the matrix order
    assert html.index(">mlp<") < html.index(">perceiver<")


def test_cli_report_builds_when_all_but_one_cell_failed(tmp_path):
    fail = ("resampler", "panobench train: error: out of memory\n")
    manifest = write_records(tmp_path, overlaps=(0.0, 0.5), resamplers=("mlp",), seeds=(0,),
                             failures={"ov0.00_fov90_mlp_vis-pretrained_seed0": fail})
    tile = tmp_path / "t.png"
    Image.new("RGB", (8, 4)).save(tile)
    out = tmp_path / "reports" / "x"
    assert cli_main(["aggregate", "--manifest", str(manifest), "--out", str(out / "results.csv"),
                     "--root", str(tmp_path)]) == 0
    assert cli_main(["report", "--results", str(out / "results.csv"), "--manifest", str(manifest), "--out", str(out),
                     "--root", str(tmp_path), "--tiles", f"0.0={tile}"]) == 0
    html = (out / "report.html").read_text()
    assert "panobench train: error: out of memory" in html
    assert html.count(IMG_TAG) == len(list((out / "figures").glob("*.png"))) + 1 == 8
    assert cli_main(["report", "--results", str(out / "results.csv"), "--manifest", str(manifest), "--out", str(out),
                     "--tiles", "zero"]) == 2


# ------------------------------------------------------------------------------------------ helpers


def test_parse_tiles():
    assert parse_tiles(["0.5=a.png", "0=b.png"]) == {0.5: Path("a.png"), 0.0: Path("b.png")}
    with pytest.raises(InputError):
        parse_tiles(["a.png"])


def test_pareto_front_maximises_both():
    x = np.array([10.0, 20.0, 30.0, 15.0, 30.0])
    y = np.array([0.9, 0.8, 0.5, 0.7, 0.4])
    assert pareto_front(x, y).tolist() == [0, 1, 2]


def test_ci_and_order_helpers():
    assert math.isnan(ci95_halfwidth([1.0]))
    assert ci95_halfwidth([1.0, 2.0, 3.0]) == pytest.approx(stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3))
    assert resampler_order(["perceiver", "zeta", "mlp", "bimamba", "alpha"]) == [
        "mlp", "bimamba", "perceiver", "alpha", "zeta"]
