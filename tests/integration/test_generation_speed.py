"""Generation's fast path (merged LoRA, static KV cache, fixed shapes, compiled decode) yields exactly the plain
path's greedy tokens, and generation.json reports prefill, decode and end-to-end speed with a warm-up paid once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from panobench.evaluation import generate as gen
from panobench.evaluation.generate import generate_predictions

PLAIN = {"static_cache": False, "merge_lora": False, "compile": False}
FAST = {"static_cache": True, "merge_lora": True, "compile": True}


def _with_eval(cfg, batch_size: int, **flags):
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, batch_size=batch_size, max_new_tokens=12,
                                                             **flags))


def _predictions(cfg, stage: str, out: Path) -> tuple[list[str], dict]:
    generation = generate_predictions(cfg, stage, out)
    return pd.read_csv(out / "predictions.csv")["prediction"].tolist(), generation


@pytest.fixture(autouse=True)
def _fresh_models():
    gen._LOADED.clear()   # each test builds its own models: nothing carried over from another test
    yield
    gen._LOADED.clear()


@pytest.mark.parametrize(("merge_lora", "compile_decode"), [(True, True), (False, True), (True, False)])
def test_fast_path_gives_the_plain_greedy_tokens(trained_cell, tmp_path: Path, merge_lora: bool,
                                                 compile_decode: bool) -> None:
    # Batch 3 over 8 groups: a short last batch (filled with 2 repeats for the compiled decode step), and prompts
    # that differ in length across batches.
    plain, plain_rec = _predictions(_with_eval(trained_cell.cfg, 3, **PLAIN), "finetune", tmp_path / "plain")
    fast_cfg = _with_eval(trained_cell.cfg, 3, **{**FAST, "merge_lora": merge_lora, "compile": compile_decode})
    fast, fast_rec = _predictions(fast_cfg, "finetune", tmp_path / "fast")
    assert fast == plain
    assert plain_rec["static_cache"] is False and plain_rec["compiled_decode"] is False
    assert plain_rec["lora_merged"] is False and plain_rec["padded_rows"] == 0
    assert fast_rec["static_cache"] is True and fast_rec["compiled_decode"] is compile_decode
    assert fast_rec["compile_error"] is None and fast_rec["lora_merged"] is merge_lora
    assert fast_rec["padded_rows"] == (-len(plain) % 3 if compile_decode else 0)
    # The warm-up compiled the decode step for the one shape every timed batch has: no recompilation while timed.
    assert (fast_rec["graphs_compiled_in_warmup"] > 0) is compile_decode
    assert fast_rec["graphs_compiled_while_timed"] == 0 and plain_rec["graphs_compiled_in_warmup"] == 0


def test_untrained_baseline_has_no_lora_to_merge(trained_cell, tmp_path: Path) -> None:
    _, rec = _predictions(_with_eval(trained_cell.cfg, 4, **FAST), "baseline", tmp_path / "baseline")
    assert rec["lora_merged"] is None and rec["checkpoint"] is None


def test_generation_record_splits_prefill_and_decode(trained_cell, tmp_path: Path) -> None:
    cfg = _with_eval(trained_cell.cfg, 4, **FAST)
    _, finetune = _predictions(cfg, "finetune", tmp_path / "finetune")
    _, blind = _predictions(cfg, "blind", tmp_path / "blind")
    for rec in (finetune, blind):
        for key in ("prefill_s", "decode_s", "seconds", "prefill_s_per_sample", "latency_s_per_sample",
                    "end_to_end_tokens_per_s", "tokens_per_s", "generated_tokens", "batch_size", "prompt_tokens_max"):
            assert rec[key] is not None and rec[key] > 0, (key, rec[key])
        assert rec["tokens_per_s"] == rec["end_to_end_tokens_per_s"]
        assert rec["seconds"] == pytest.approx(rec["prefill_s"] + rec["decode_s"])
        assert 0 <= rec["decode_tokens"] <= rec["generated_tokens"] - rec["num_samples"]
        if rec["decode_tokens"]:
            assert rec["decode_tokens_per_s"] > 0
    # One warm-up per model and process: blind reuses the finetuned model (and its compiled decode step).
    assert finetune["warmup_s"] > 0 and blind["warmup_s"] is None
    assert blind["image"].startswith("constant grey") and blind["checkpoint"] == finetune["checkpoint"]
