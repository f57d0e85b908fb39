"""The main job: the embedded default config runs end to end on CPU, and what it produces.

One session-scoped run of `snakemake --cores all` on config/config.yaml (16 cells, 2 seeds) in a scratch copy of the
workflow; the tests below inspect its outputs. This is the slowest part of the suite (several minutes).
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from workflow_helpers import REPO, copy_workflow, run_snakemake, snakemake_env

CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
NAME = CONFIG["name"]
SPEED_COLUMNS = ["step_time_median_s", "step_time_p90_s", "samples_per_s", "tokens_per_s", "peak_host_rss_gib",
                 "flops_per_step", "num_views", "visual_tokens_per_sample", "params_trainable", "params_total",
                 "kernel_path", "bench_s"]
WALL_S: dict[str, float] = {}
METRIC_COLUMNS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


@pytest.fixture(scope="session")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("default") / "wf")
    start = time.perf_counter()
    run_snakemake(workdir, "--cores", "all")
    WALL_S["default"] = time.perf_counter() - start
    return workdir


@pytest.fixture(scope="session")
def results(default_run: Path) -> pd.DataFrame:
    return pd.read_csv(default_run / "reports" / NAME / "results.csv")


def test_one_row_per_cell_and_stage_all_ok(results: pd.DataFrame, measured) -> None:
    measured(f"embedded default: {WALL_S['default']:.0f} s wall, {results['cell_id'].nunique()} cells")
    m = CONFIG["matrix"]
    cells = len(m["overlaps"]) * len(m["resamplers"]) * len(m["vision_checkpoints"]) * len(m["seeds"])
    assert len(results) == cells * 2
    assert set(results["stage"]) == {"resampler", "finetune"}
    assert results.groupby(["cell_id", "stage"]).size().eq(1).all()
    assert (results["status"] == "ok").all(), results.loc[results["status"] != "ok", ["cell_id", "error"]]


def test_no_missing_speed_or_metric_values(results: pd.DataFrame) -> None:
    assert results[SPEED_COLUMNS].notna().all().all(), results[SPEED_COLUMNS].isna().sum()
    evaluated = results[results["stage"].isin(CONFIG["eval_stages"])]
    assert len(evaluated) > 0
    cols = METRIC_COLUMNS + [f"baseline_{c}" for c in METRIC_COLUMNS] + ["gen_tokens_per_s"]
    assert evaluated[cols].notna().all().all(), evaluated[cols].isna().sum()


def test_overlap_changes_what_the_model_sees(results: pd.DataFrame) -> None:
    """5 views at overlap 0, 9 at overlap 0.5 (FOV 90), and more visual tokens per sample."""
    views = results.groupby("overlap")["num_views"].unique()
    assert list(views.loc[0.0]) == [5] and list(views.loc[0.5]) == [9]
    tokens = results.groupby("overlap")["visual_tokens_per_sample"].min()
    assert tokens.loc[0.5] > tokens.loc[0.0]


def _cidr_ratio(results: pd.DataFrame, measured) -> tuple[pd.DataFrame, float]:
    final = results[results["stage"] == "finetune"]
    ratio = final["CIDEr"].mean() / max(final["baseline_CIDEr"].mean(), 1e-6)
    print("\n" + final[["cell_id", "baseline_CIDEr", "CIDEr", "blind_CIDEr"]].to_string(index=False))
    measured(f"mean CIDEr: untrained baseline {final['baseline_CIDEr'].mean():.3f} -> finetune "
             f"{final['CIDEr'].mean():.3f} ({ratio:.2f}x); blind {final['blind_CIDEr'].mean():.3f}; finetune > blind "
             f"in {(final['CIDEr'] > final['blind_CIDEr']).sum()} of {len(final)} cells")
    return final, ratio


def test_training_beats_the_untrained_baseline(results: pd.DataFrame, measured) -> None:
    """Short CPU training moves CIDEr well above the untrained (stage-2 start) model in most cells.

    The untrained baseline already speaks the caption language (the tiny LM is warmed up on training captions), so
    its CIDEr is not zero. Measured on this default: 2.25x (mean over 16 cells); 2x guards against a regression.
    """
    final, ratio = _cidr_ratio(results, measured)
    assert (final["CIDEr"] > final["baseline_CIDEr"]).mean() >= 0.75
    assert ratio >= 2.0


# Issue 11's targets the embedded default does not meet yet (measured on its 16 cells: 2.25x the untrained baseline;
# finetune CIDEr 2.41 vs blind 2.38, the trained model beating its blind self in 5 of 16 cells): the tiny models learn
# the caption language in 70 steps but not where to look (docs/embedded-default.md: what was measured and tried).
# Strict: when they start to pass, the suite says so.
NOT_YET = pytest.mark.xfail(strict=True, reason="issue 11: the embedded default's tiny models do not learn to use "
                                                "the image in their short schedule (docs/embedded-default.md)")


@NOT_YET
def test_training_triples_the_untrained_baseline(results: pd.DataFrame, measured) -> None:
    """Issue 11's target: the default's finetune CIDEr is >= 3x its untrained baseline (mean over cells)."""
    _, ratio = _cidr_ratio(results, measured)
    assert ratio >= 3.0


def test_vision_recipe_trained_once_and_reused_symmetrically(default_run: Path) -> None:
    """One stage-1 run serves every cell that names it, and initialises only the vision tower: the recipe trained an
    mlp resampler, yet the mlp arm starts its resampler fresh like every other arm (symmetric starts)."""
    recipes = [v for v in CONFIG["matrix"]["vision_checkpoints"] if "train" in v]
    logs = list((default_run / "logs" / NAME / "train_vision").glob("*.log"))
    assert len(logs) == len(recipes) == 1
    metas = [json.loads(p.read_text()) for p in default_run.glob(f"runs/{NAME}/*vis-{recipes[0]['name']}*/resampler/"
                                                                  "*/checkpoint_metadata.json")]
    m = CONFIG["matrix"]
    assert len(metas) == len(m["overlaps"]) * len(m["resamplers"]) * len(m["seeds"])
    sources = {m["init_sources"]["vision_checkpoint"] for m in metas}
    assert len(sources) == 1
    assert {m["resampler_init"] for m in metas} == {"fresh"}


def test_every_arm_feeds_the_lm_the_same_tokens_per_view(results: pd.DataFrame) -> None:
    per_view = results["visual_tokens_per_sample"] / results["num_views"]
    assert set(per_view) == {CONFIG["tokens_per_view"]}
    assert results.groupby("overlap")["visual_tokens_per_sample"].nunique().eq(1).all()


def test_captions_keep_their_first_word(default_run: Path, measured) -> None:
    """>= 90 % of finetune predictions start with the first word of one of their references (the embedded default's
    first-word bug made this 0 %)."""
    from panobench.evaluation.predictions import first_word_matches, read_predictions

    rates = {}
    for path in sorted(default_run.glob(f"runs/{NAME}/*/eval/finetune/predictions.csv")):
        frame = read_predictions(path)
        rates[path.parts[-4]] = sum(first_word_matches(p, r) for p, r in zip(frame["prediction"], frame["references"],
                                                                              strict=True)) / len(frame)
    overall = sum(rates.values()) / len(rates)
    measured(f"first-word match rate, finetune: mean {overall:.3f}, min {min(rates.values()):.3f} over {len(rates)} "
             "cells")
    assert overall >= 0.9, rates


@NOT_YET
def test_trained_model_uses_the_image(default_run: Path, results: pd.DataFrame) -> None:
    """The finetuned model beats its blind self (grey panorama, same prompt and decoding) on CIDEr in most cells."""
    rows = []
    for cell in results["cell_id"].unique():
        trained = json.loads((default_run / "runs" / NAME / cell / "eval" / "finetune" / "metrics.json").read_text())
        blind = json.loads((default_run / "runs" / NAME / cell / "eval" / "blind" / "metrics.json").read_text())
        rows.append((cell, trained["metrics"]["CIDEr"], blind["metrics"]["CIDEr"]))
    table = pd.DataFrame(rows, columns=["cell_id", "CIDEr", "blind_CIDEr"])
    print("\n" + table.to_string(index=False))
    print(f"mean CIDEr: blind {table['blind_CIDEr'].mean():.3f} -> trained {table['CIDEr'].mean():.3f}")
    assert (table["CIDEr"] > table["blind_CIDEr"]).mean() > 0.5


def test_report_is_self_contained_and_embeds_every_figure(default_run: Path) -> None:
    report = default_run / "reports" / NAME
    html = (report / "report.html").read_text()
    figures = sorted((report / "figures").glob("*.png"))
    assert len(figures) >= 5
    embedded = re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    payloads = {base64.b64decode(e) for e in embedded}
    for fig in figures:
        assert fig.read_bytes() in payloads, f"{fig.name} is not embedded"
    tiles = sorted((default_run / "results" / NAME / "tiles").glob("*.png"))
    assert len(tiles) == len(CONFIG["matrix"]["overlaps"])
    for tile in tiles:
        assert tile.read_bytes() in payloads, f"{tile.name} is not embedded"
    assert not re.search(r'(src|href)="(https?:|file:|/)', html)


def test_second_run_does_nothing(default_run: Path) -> None:
    proc = run_snakemake(default_run, "-n", "--cores", "all")
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_snakemake_report(default_run: Path) -> None:
    run_snakemake(default_run, "--report", "report.zip")
    assert (default_run / "report.zip").stat().st_size > 10_000


def test_eval_of_a_training_run_directory_from_the_cli(default_run: Path) -> None:
    """`panobench eval --checkpoint-dir` on a directory the training code wrote (loads LoRA strictly)."""
    run_dir = next(default_run.glob(f"runs/{NAME}/ov0.50_*_mlp_vis-*_seed0/finetune/anyres-e2p_mlp"))
    out = default_run / "eval-cli"
    proc = subprocess.run([sys.executable, "-m", "panobench", "eval", "--checkpoint-dir", str(run_dir),
                           "--out", str(out)], cwd=default_run, env=snakemake_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    workflow_metrics = json.loads((run_dir.parents[1] / "eval" / "finetune" / "metrics.json").read_text())
    assert metrics["metrics"]["CIDEr"] == pytest.approx(workflow_metrics["metrics"]["CIDEr"])
    assert (run_dir / "lora_weights" / "adapter_model.safetensors").is_file()
