"""Captions start like captions, and the blind evaluation really removes the image.

The embedded default's LM is a tiny random Qwen3 warmed up on the training captions. Warmed up on bare caption
texts, no position ever had a caption's first token as its target, so every generated caption began mid-sentence
("are three objects …" for "there are three objects …"): visible in any predictions.csv, invisible to n-gram
metrics' tests. These tests run a tiny pipeline (warm-up, stage 2, stage 3, generation) and check the first words.
"""

from __future__ import annotations

import collections
import csv
import json
from pathlib import Path

import pytest

from panobench.evaluation.generate import generate_predictions
from panobench.evaluation.predictions import first_word_matches, read_predictions
from panobench.training.runner import train_stage

WARMUP_STEPS = 150


@pytest.fixture(scope="module")
def warmed(tiny, tmp_path_factory):
    """Tiny models whose LM is warmed up in the stages' chat format (what the workflow's materialize rule does)."""
    from panobench.models.materialize import materialize_tiny_models

    out = tmp_path_factory.mktemp("warm") / "models"
    manifest = materialize_tiny_models(out, [tiny.data / "train.csv", tiny.data / "valid.csv"], seed=0,
                                       lm_warmup_steps=WARMUP_STEPS, lm_warmup_csv=tiny.data / "train.csv")
    return out, manifest


def _caption_first_words(csv_path: Path) -> set[str]:
    with open(csv_path, encoding="utf-8", newline="") as f:
        return {row["annotation"].split()[0].lower() for row in csv.DictReader(f)}


def test_warm_up_trains_the_answer_start_in_the_chat_format(warmed):
    _, manifest = warmed
    assert manifest["lm_warmup"]["format"].startswith("chat")
    assert manifest["lm_warmup"]["loss_last"] < manifest["lm_warmup"]["loss_first"]


@pytest.fixture(scope="module")
def tiny_run(warmed, config_maker, tmp_path_factory):
    """Stage 2 and stage 3 of one cell on the warmed-up LM, then finetune, blind and baseline generations."""
    models, _ = warmed
    runs = tmp_path_factory.mktemp("firstword") / "runs"
    stage = {"max_steps": 12, "batch_size": 8, "val_every_n_steps": 6, "limit_val_batches": 1, "lr": 3e-3}
    cfg = config_maker(runs, vision={"name_or_path": str(models / "vision")},
                      llm={"name_or_path": str(models / "llm")}, geometry={"overlap": 0.0},
                      stages={"resampler": stage, "finetune": stage}, runtime={"measure_flops": False},
                      eval={"max_new_tokens": 24, "batch_size": 16})
    train_stage(cfg, "resampler")
    train_stage(cfg, "finetune")
    out = runs.parent / "eval"
    for name in ("finetune", "blind", "baseline"):
        generate_predictions(cfg, name, out / name)
    return cfg, out


def test_generated_captions_begin_with_a_caption_start_not_a_mid_sentence_word(tiny, tiny_run):
    _, out = tiny_run
    starts = _caption_first_words(tiny.data / "train.csv")
    for name in ("finetune", "baseline"):
        frame = read_predictions(out / name / "predictions.csv")
        first = [p.split()[0].lower() if p.split() else "" for p in frame["prediction"]]
        plausible = sum(word in starts for word in first) / len(first)
        matches = sum(first_word_matches(p, r) for p, r in zip(frame["prediction"], frame["references"], strict=True))
        assert plausible >= 0.9, (name, collections.Counter(first).most_common(5), sorted(starts))
        assert matches / len(frame) >= 0.5, (name, frame[["prediction", "references"]].head(5).to_dict("records"))


def test_blind_evaluation_sees_no_image(tiny_run):
    """Blind = the finetuned checkpoint with a constant grey panorama: the caption depends on the query alone."""
    _, out = tiny_run
    blind = read_predictions(out / "blind" / "predictions.csv")
    by_query = blind.groupby("query")["prediction"].nunique()
    repeated = blind["query"].value_counts()
    assert (by_query[repeated[repeated > 1].index] == 1).all()      # same query, different images -> same words
    gen = json.loads((out / "blind" / "generation.json").read_text())
    ft = json.loads((out / "finetune" / "generation.json").read_text())
    assert gen["image"].startswith("constant grey") and ft["image"] == "dataset"
    assert gen["checkpoint"] == ft["checkpoint"] and gen["checkpoint_step"] == ft["checkpoint_step"]
    assert gen["decoding"] == ft["decoding"]
    finetuned = read_predictions(out / "finetune" / "predictions.csv")
    assert list(finetuned["sample_id"]) == list(blind["sample_id"])
