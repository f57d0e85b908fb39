"""Caption generation for one (cell, stage): one prediction per (image, query) group with one decoding config.

Stages: ``baseline`` = the untrained model exactly as stage 2 starts (vision source + seeded fresh
resampler/projector/PE), so the report shows how far training moved the metrics; ``resampler`` / ``finetune`` =
that stage's ``best.ckpt`` (else ``last.ckpt``), loaded strictly; ``blind`` = the finetuned model shown a constant
grey panorama (same prompt, same decoding): what it says without image information, so the report can show how
much the image helps. Writes ``predictions.csv`` and
``generation.json`` (decoding config, speed) atomically; scoring is a separate CPU step (``panobench score``).

Speed. Greedy decoding (``num_beams`` 1, no sampling) takes a fast path that yields the same tokens: LoRA folded
into the LM weights (``eval.merge_lora``), a preallocated KV cache reused by every batch (``eval.static_cache``),
fixed shapes (prompts left-padded to the longest of the eval set — position ids follow the mask, so real tokens
see exactly what they saw before) and, with ``eval.compile`` (default ``runtime.compile``), a compiled decode step,
for which a short last batch is filled with repeats whose outputs are dropped. Each timed batch is split at the first
new token: prefill = vision encoding + prompt prefill, decode = the rest. One untimed warm-up batch is paid once
per loaded model (one row on a CPU without compilation, where first-call costs do not depend on the batch): the
``finetune`` and ``blind`` stages of one process share the model, its cache and its warm-up.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from panobench.config import RunConfig, config_hash
from panobench.data.collate import GenerateCollator
from panobench.data.csvdata import PanoramaCaptionDataset
from panobench.errors import CheckpointError
from panobench.evaluation.predictions import GENERATION_SIDECAR, write_predictions
from panobench.models.assembly import build_stage_model
from panobench.models.checkpoint import load_stage_checkpoint
from panobench.stages import EVAL_STAGE_NAMES, EVAL_STAGES, stage_dir
from panobench.utils.io import read_json, write_json_atomic
from panobench.utils.repro import device_description, git_revision, package_versions, seed_everything

logger = logging.getLogger(__name__)

BLIND_GREY = 128   # the blind evaluation's constant panorama value (uint8, every channel)


def find_checkpoint(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise CheckpointError(f"{run_dir}: no best.ckpt or last.ckpt")


@dataclass
class _Loaded:
    """A model ready to generate, kept for the next stage of the same process when it uses the same weights."""

    key: tuple[Any, ...]
    model: Any
    prompts: Any
    checkpoint: Path | None
    checkpoint_step: int | None
    lora_merged: bool | None          # None: no LoRA in these weights
    warm: bool = False                # its untimed warm-up batch has run
    compiled: bool = False            # the decode step compiles (False after a compile failure, see compile_error)
    compile_error: str | None = None
    cache: Any = None                 # the static KV cache and the shape it was made for
    cache_shape: tuple[int, int] | None = None


_LOADED: dict[str, _Loaded] = {}      # one entry: the last model used, reused by a following stage of equal weights


def _use_fast_path(cfg: RunConfig) -> tuple[bool, bool]:
    """(static cache and fixed shapes, compiled decode) for this config: greedy decoding only."""
    greedy = cfg.eval.num_beams == 1 and not cfg.eval.do_sample
    static = greedy and cfg.eval.static_cache
    compiled = cfg.runtime.compile if cfg.eval.compile is None else cfg.eval.compile
    return static, static and compiled


def _load(cfg: RunConfig, stage: str, checkpoint: str | Path | None, device: torch.device) -> _Loaded:
    """Build (or reuse) the model that ``stage`` generates with."""
    spec = EVAL_STAGES[stage]
    weights_stage = spec.weights
    ckpt_path = None
    if weights_stage is not None:
        ckpt_path = Path(checkpoint) if checkpoint else find_checkpoint(stage_dir(cfg, weights_stage))
    # The checkpoint's size and mtime too: a file replaced in place is a different model.
    stamp = (str(ckpt_path.resolve()), ckpt_path.stat().st_size, ckpt_path.stat().st_mtime_ns) \
        if ckpt_path and ckpt_path.is_file() else str(ckpt_path)
    key = (config_hash(cfg), weights_stage, stamp, str(device))
    cached = _LOADED.get("model")
    if cached is not None and cached.key == key:
        return cached
    _LOADED.clear()                   # frees the previous model before the next is built
    checkpoint_step = None
    # The previous stage's weights are not loaded: the stage checkpoint overwrites every component inherited from it.
    built = build_stage_model(cfg, spec.builds, load_previous=False)
    if weights_stage is not None:
        checkpoint_step = load_stage_checkpoint(built.model, cfg, weights_stage, ckpt_path).get("global_step")
    model = built.model.to(device).eval()
    lora_merged = None
    if hasattr(model.lm, "merge_and_unload"):          # a peft model: stage-3 weights
        lora_merged = bool(cfg.eval.merge_lora)
        if lora_merged:
            # W + scale·B·A folded into the base weights: decoding runs the plain LM, no adapter matmuls.
            model.lm = model.lm.merge_and_unload()
    loaded = _Loaded(key, model, built.prompts, ckpt_path, checkpoint_step, lora_merged,
                     compiled=_use_fast_path(cfg)[1])
    _LOADED["model"] = loaded
    return loaded


def _compile_config(device: torch.device) -> Any:
    """transformers' CompileConfig for the decode step: its defaults (inductor, CUDA graphs) on a GPU; on a CPU the
    same Dynamo tracing without code generation (aot_eager), which transformers must be told to allow."""
    from transformers import CompileConfig

    if device.type == "cuda":
        return CompileConfig()
    config = CompileConfig(backend="aot_eager", mode=None)
    config._compile_all_devices = True
    return config


def _static_cache(loaded: _Loaded, rows: int, length: int) -> Any:
    """The static KV cache for ``rows`` sequences of ``length`` positions, made once per model and shape."""
    from transformers import StaticCache

    if loaded.cache is None or loaded.cache_shape != (rows, length):
        loaded.cache = StaticCache(config=loaded.model.causal_lm().config, max_cache_len=length)
        loaded.cache_shape = (rows, length)
    loaded.cache.reset()
    return loaded.cache


def _fix_shapes(batch: dict[str, Any], prompt_len: int, rows: int, pad_id: int) -> dict[str, Any]:
    """Left-pad prompts to ``prompt_len`` and fill the batch to ``rows`` (0: leave it) with repeats of its last row."""
    ids, mask, erp = batch["input_ids"], batch["attention_mask"], batch["erp"]
    extra = prompt_len - ids.shape[1]
    if extra > 0:
        ids = torch.cat([ids.new_full((ids.shape[0], extra), pad_id), ids], dim=1)
        mask = torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1)
    fill = rows - ids.shape[0]
    if fill > 0:
        ids, mask, erp = (torch.cat([t, t[-1:].expand(fill, *t.shape[1:])], dim=0) for t in (ids, mask, erp))
    return {**batch, "input_ids": ids, "attention_mask": mask, "erp": erp}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process (a count that grows during timing means recompilation)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def generate_predictions(cfg: RunConfig, stage: str, out_dir: str | Path, *, csv_input: str | None = None,
                         checkpoint: str | Path | None = None,
                         data_fingerprint: str | Path | None = None) -> dict[str, Any]:
    """Generate captions for every (image, query) group of ``csv_input`` (default: the config's test CSV).

    ``data_fingerprint``: JSON from ``panobench fingerprint``, recorded in generation.json as ``data``.
    """
    if stage not in EVAL_STAGES:
        raise ValueError(f"unknown eval stage {stage!r}; expected one of {EVAL_STAGE_NAMES}")
    grey = EVAL_STAGES[stage].image == "grey"
    seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.runtime.accelerator != "cpu" else "cpu")
    loaded = _load(cfg, stage, checkpoint, device)
    model, prompts = loaded.model, loaded.prompts

    csv_path = csv_input or cfg.data.test_csv
    dataset = PanoramaCaptionDataset(csv_path, cfg.data.root, erp_size=(cfg.data.erp_height, cfg.data.erp_width),
                                     grouped=True)
    indices = list(range(len(dataset)))
    if cfg.data.max_eval_samples is not None:
        indices = indices[: cfg.data.max_eval_samples]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=cfg.eval.batch_size, shuffle=False,
                        collate_fn=GenerateCollator(prompts, model.pad_id), num_workers=cfg.data.num_workers)
    decoding = {"max_new_tokens": cfg.eval.max_new_tokens, "num_beams": cfg.eval.num_beams,
                "do_sample": cfg.eval.do_sample, "prompt_instruction": cfg.prompt_instruction}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.runtime.precision.startswith("bf16"))
    static, _ = _use_fast_path(cfg)
    rows_per_batch = min(cfg.eval.batch_size, len(indices))
    prompt_len = max((len(prompts.prompt_ids(dataset.query(i))) for i in indices), default=0)
    cache_len = prompt_len - 1 + model.num_visual_tokens + cfg.eval.max_new_tokens   # the placeholder is replaced

    def run(batch: dict[str, Any], marks: dict[str, float] | None) -> torch.Tensor:
        erp = batch["erp"]
        if grey:
            erp = torch.full_like(erp, BLIND_GREY)   # no image information; prompt and decoding unchanged
        on_prefilled = None
        if marks is not None:
            def on_prefilled() -> None:
                _sync(device)
                marks["prefilled"] = time.perf_counter()
        fast: dict[str, Any] = {}
        if static:
            fast["cache"] = _static_cache(loaded, erp.shape[0], cache_len)
            if loaded.compiled:
                fast["compile_config"] = _compile_config(device)
        with autocast:
            return model.generate(erp.to(device), batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                  max_new_tokens=cfg.eval.max_new_tokens, num_beams=cfg.eval.num_beams,
                                  do_sample=cfg.eval.do_sample, eos_token_id=prompts.stop_token_ids,
                                  on_prefilled=on_prefilled, **fast)

    def shaped(batch: dict[str, Any]) -> dict[str, Any]:
        # Filled rows only for the compiled decode step, whose graphs are made for one batch shape; otherwise a
        # short last batch just gets a cache of its own size.
        rows = rows_per_batch if loaded.compiled else 0
        return _fix_shapes(batch, prompt_len, rows, model.pad_id) if static else batch

    warmup_s, warmup_graphs = None, None
    if not loaded.warm and indices:
        # Untimed: first-call costs (CUDA context, kernel selection, compilation, cache allocation) stay out of the
        # speed figures. A compile failure falls back to the eager decode step, recorded in generation.json.
        first = shaped(next(iter(loader)))
        if device.type == "cpu" and not loaded.compiled:
            # Without compilation a CPU's first-call costs do not depend on the batch: one row warms it up.
            first = {k: v[:1] for k, v in first.items()}
        graphs = _dynamo_graphs()
        t0 = time.perf_counter()
        try:
            run(first, None)
        except Exception as err:  # noqa: BLE001 — any compiler error: record it and decode uncompiled
            if not loaded.compiled:
                raise
            loaded.compiled, loaded.compile_error = False, f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
            logger.warning("compiled decode failed (%s); generating without compilation", loaded.compile_error)
            run(first, None)
        _sync(device)
        warmup_s = time.perf_counter() - t0
        warmup_graphs = _dynamo_graphs() - graphs
        loaded.warm = True

    graphs_before = _dynamo_graphs()
    rows, new_tokens, decode_tokens, prefill_s, decode_s, padded_rows = [], 0, 0, 0.0, 0.0, 0
    for batch in tqdm(loader, desc=f"generate {cfg.cell_id} [{stage}]", unit="batch"):
        real = len(batch["items"])
        batch = shaped(batch)
        padded_rows += batch["input_ids"].shape[0] - real
        marks: dict[str, float] = {}
        _sync(device)
        t0 = time.perf_counter()
        out = run(batch, marks)
        _sync(device)
        t1 = time.perf_counter()
        prefilled = marks.get("prefilled", t1)
        prefill_s += prefilled - t0
        decode_s += t1 - prefilled
        for item, ids in zip(batch["items"], out[:real].tolist(), strict=True):
            kept = []
            for tok in ids:
                if tok in prompts.stop_token_ids:
                    break
                kept.append(tok)
            produced = len(kept) + (1 if len(kept) < len(ids) else 0)   # the stop token is generated too
            new_tokens += produced
            decode_tokens += max(0, produced - 1)                         # the first comes out of the prefill
            rows.append({"sample_id": item["sample_id"], "image": item["url"], "query": item["query"],
                         "prediction": prompts.decode_answer(kept), "references": list(item["references"])})
    seconds = prefill_s + decode_s
    n = len(rows)
    out_dir = Path(out_dir)
    generation = {
        "stage": stage, "checkpoint": str(loaded.checkpoint) if loaded.checkpoint else None,
        "checkpoint_step": loaded.checkpoint_step,
        "image": f"constant grey {BLIND_GREY}" if grey else "dataset", "cell_id": cfg.cell_id,
        "config_hash": config_hash(cfg), "csv": str(csv_path), "decoding": decoding, "num_samples": n,
        # Speed: timed batches only (after the warm-up); prefill = vision encoding + prompt, up to the first token.
        "generated_tokens": new_tokens, "decode_tokens": decode_tokens, "seconds": seconds,
        "prefill_s": prefill_s, "decode_s": decode_s,
        "prefill_s_per_sample": prefill_s / n if n else None,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_tokens and decode_s > 0 else None,
        "end_to_end_tokens_per_s": new_tokens / seconds if new_tokens and seconds > 0 else None,
        "tokens_per_s": new_tokens / seconds if new_tokens and seconds > 0 else None,   # = end to end (older readers)
        "latency_s_per_sample": seconds / n if n else None,
        "warmup_s": warmup_s,   # null: this model's warm-up was paid by an earlier stage of the same process
        # What the fast path did.
        "batch_size": rows_per_batch, "padded_rows": padded_rows, "static_cache": static,
        "compiled_decode": static and loaded.compiled, "compile_error": loaded.compile_error,
        "lora_merged": loaded.lora_merged, "prompt_tokens_max": prompt_len - 1 + model.num_visual_tokens,
        "graphs_compiled_in_warmup": warmup_graphs, "graphs_compiled_while_timed": _dynamo_graphs() - graphs_before,
        **device_description(), "versions": package_versions(), "git_revision": git_revision(),
        "data": read_json(data_fingerprint) if data_fingerprint else None,
    }
    write_json_atomic(out_dir / GENERATION_SIDECAR, generation)
    write_predictions(out_dir / "predictions.csv", rows)   # last: its presence marks a complete generation
    logger.info("%s [%s]: %d predictions; prefill %.3f s/sample, decode %.1f tokens/s, end to end %.1f tokens/s",
                cfg.cell_id, stage, n, generation["prefill_s_per_sample"] or 0, generation["decode_tokens_per_s"] or 0,
                generation["tokens_per_s"] or 0)
    return generation
