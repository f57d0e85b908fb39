"""Assemble a stage's PanoVLM from a resolved config: backbones, resampler/projector/PE, start weights, LoRA.

Start weights per stage come from the stage table (:mod:`panobench.stages`):
- the vision tower: the pretrained backbone, or the stage-1 checkpoint (``vision.checkpoint``) for stages that
  start from it (``vision_from_checkpoint``): its vision encoder loaded strictly; its resampler only with
  ``vision.reuse_resampler`` (and then it must fit) — recorded as ``resampler_init`` ("fresh" or "loaded");
- the stage's ``inherits`` components: the ``previous`` stage's ``best.ckpt`` of this cell, loaded strictly;
- LoRA adapters, fresh, for stages that attach them.

Pure torch (no Lightning): training wraps the result in its LightningModule; evaluation uses it as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from panobench.config import RunConfig, model_signature
from panobench.data.prompts import PromptBuilder
from panobench.errors import CheckpointError
from panobench.models.backbones import load_language_model, load_tokenizer, load_vision_backbone
from panobench.models.checkpoint import (
    check_same_run,
    has_component,
    load_checkpoint_file,
    load_component,
    load_vision_checkpoint,
)
from panobench.models.vlm import PanoVLM
from panobench.stages import get_stage, stage_dir

logger = logging.getLogger(__name__)


def compute_dtype(cfg: RunConfig) -> torch.dtype | None:
    """bf16 for frozen backbones when training in bf16, else None (the default dtype).

    Frozen backbones in bf16 halve their memory and autocast no longer re-casts their weights every step;
    trainable parts (resampler, projector, PE, LoRA) stay fp32 (AMP).
    """
    return torch.bfloat16 if cfg.runtime.precision.startswith("bf16") else None


def build_device(cfg: RunConfig) -> torch.device | None:
    """Where the backbones are built: this process's GPU on CUDA runs (random init of ~1 B parameters on the CPU
    took longer than the whole measured run), None (CPU) otherwise. Under DDP each rank builds on its LOCAL_RANK."""
    wants_cuda = cfg.runtime.accelerator == "cuda" or (cfg.runtime.accelerator == "auto" and torch.cuda.is_available())
    if not wants_cuda or not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def build_model(cfg: RunConfig, stage: str | None = None) -> tuple[PanoVLM, Any, PromptBuilder]:
    """Backbones (on the GPU when the run is on CUDA), resampler, projector, PE and the prompt builder.

    The vision tower is built in bf16 only when it is frozen: every stage that does not train it.
    """
    tokenizer = load_tokenizer(cfg.llm.tokenizer or cfg.llm.name_or_path)
    device = build_device(cfg)
    vision_frozen = stage is not None and "vision" not in get_stage(stage).trains
    vision_dtype = compute_dtype(cfg) if vision_frozen else None
    with device if device is not None else contextlib.nullcontext():
        vision = load_vision_backbone(cfg.vision.name_or_path, init=cfg.vision.init, arch=dict(cfg.vision.arch),
                                      dtype=vision_dtype)
        lm = load_language_model(cfg.llm.name_or_path, init=cfg.llm.init, arch=dict(cfg.llm.arch),
                                 dtype=compute_dtype(cfg))
    prompts = PromptBuilder(tokenizer, instruction_template=cfg.prompt_instruction)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Geometry, resampler, projector and PE are small and built on the CPU (their set-up uses NumPy), then moved.
    model = PanoVLM(cfg, vision, lm, placeholder_id=prompts.placeholder_id, pad_id=pad_id)
    if device is not None:
        model.to(device)
    return model, tokenizer, prompts


def enable_gradient_checkpointing(model: PanoVLM) -> None:
    """Recompute each LM decoder layer in backward instead of keeping its activations (non-reentrant; the FLOP
    counter leaves the recomputation out)."""
    model.causal_lm().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_blocks(model: PanoVLM, device_type: str) -> int:
    """``runtime.compile``: compile each transformer block of the LM and the vision tower in place.

    Regional compilation: every block of a tower has the same code, so the first compile is reused by the others
    (seconds, not minutes) and element-wise chains (RMSNorm, RoPE, SiLU-gate, residual adds, LoRA's scale-add) are
    fused. ``nn.Module.compile`` keeps parameter names, so checkpoints and LoRA adapters are unchanged.

    LM blocks are compiled shape-generic from the start (``dynamic=True``): the text length changes with every
    batch, and a first, length-specialised graph would only be thrown away at the second batch. Vision blocks see
    one shape per run and stay specialised. Backend: inductor on CUDA; on a CPU ``aot_eager`` — the same Dynamo and
    AOTAutograd tracing (graph breaks, guards, recompiles) without generating kernels, so CPU runs and CI exercise
    the compiled path in seconds. Returns the number of blocks compiled.
    """
    backend = "inductor" if device_type == "cuda" else "aot_eager"
    causal = model.causal_lm()
    decoder = causal.get_decoder() if hasattr(causal, "get_decoder") else causal.model
    for block in decoder.layers:
        block.compile(backend=backend, dynamic=True)
    for block in model.vision.encoder_layers():
        block.compile(backend=backend)
    return len(decoder.layers) + len(model.vision.encoder_layers())


def attach_lora(model: PanoVLM, cfg: RunConfig) -> None:
    """Wrap the LM in fresh LoRA adapters (``cfg.lora``); the base weights stay as they are."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none")
    model.lm = get_peft_model(model.lm, lora)
    if compute_dtype(cfg) is not None:
        keep_lora_inputs_in_compute_dtype(model.lm)


def keep_lora_inputs_in_compute_dtype(lm: Any) -> int:
    """Stop peft from casting each LoRA layer's input to the adapter's dtype; returns the layers changed.

    peft keeps the adapter weights in fp32 (AMP master weights) and, by default, casts the bf16 activation entering
    every adapter to fp32 — which bf16 autocast then casts straight back for the matmul: two full-size copies per
    adapted projection (7 per layer, forward and backward; a quarter of the eager step's CUDA time on an H200) and
    a private bf16 copy kept per adapter for its weight gradient. Under autocast the matmul sees the same bf16
    values either way, so the result is unchanged. Only for bf16 runs (autocast active around every LM call).
    """
    changed = 0
    for module in lm.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False
            changed += 1
    return changed


@dataclass
class StageModel:
    """A stage's model with its start weights, and where they came from."""

    model: PanoVLM
    prompts: PromptBuilder
    tokenizer: Any
    resampler_init: str = "fresh"
    init_sources: dict[str, str | None] = field(default_factory=dict)
    vision_checkpoint: str | None = None   # absolute path of the stage-1 checkpoint the vision tower came from
    previous_checkpoint: str | None = None  # the previous stage's checkpoint the inherited components came from


def build_stage_model(cfg: RunConfig, stage: str, *, vision_checkpoint: str | os.PathLike | None = None,
                      previous_stage_checkpoint: str | os.PathLike | None = None,
                      load_previous: bool = True) -> StageModel:
    """The model for ``stage`` with its start weights (see the module docstring).

    ``vision_checkpoint`` overrides ``vision.checkpoint``; ``previous_stage_checkpoint`` overrides the previous
    stage's ``best.ckpt`` in this cell's run tree. ``load_previous=False`` skips the previous stage's weights: for
    evaluation, whose stage checkpoint overwrites every inherited component anyway.
    """
    spec = get_stage(stage)
    torch.manual_seed(cfg.seed)   # fresh resampler/projector/PE init is a function of the seed
    model, tokenizer, prompts = build_model(cfg, stage)
    built = StageModel(model, prompts, tokenizer,
                       init_sources={"vision": cfg.vision.name_or_path, "llm": cfg.llm.name_or_path})
    vision_ckpt = vision_checkpoint or cfg.vision.checkpoint
    if spec.vision_from_checkpoint and vision_ckpt:
        built.resampler_init = load_vision_checkpoint(model, cfg, Path(vision_ckpt))
        built.init_sources["vision_checkpoint"] = str(vision_ckpt)
        built.vision_checkpoint = str(Path(vision_ckpt).resolve())
    if spec.previous is not None and load_previous:
        prev = Path(previous_stage_checkpoint or stage_dir(cfg, spec.previous) / "best.ckpt")
        ckpt = load_checkpoint_file(prev)
        check_same_run(ckpt["panobench"], {"stage": spec.previous, "model_signature": model_signature(cfg)},
                       what=f"stage-{get_stage(spec.previous).number} checkpoint {prev}")
        # The previous stage's checkpoint holds no vision weights: this stage must start from the same encoder.
        if "vision_checkpoint" in ckpt["panobench"] and ckpt["panobench"]["vision_checkpoint"] != \
                built.vision_checkpoint:
            raise CheckpointError(f"{prev}: stage {get_stage(spec.previous).number} used vision checkpoint "
                                  f"{ckpt['panobench']['vision_checkpoint']}, this stage-{spec.number} run uses "
                                  f"{built.vision_checkpoint} (set vision.checkpoint alike)")
        for comp in spec.inherits:
            if has_component(model, comp):
                load_component(model, ckpt, comp, prev)
        built.init_sources[f"stage{get_stage(spec.previous).number}_checkpoint"] = str(prev)
        built.previous_checkpoint = str(prev)
        built.resampler_init = f"stage{get_stage(spec.previous).number}"
    if spec.attaches_lora:
        attach_lora(model, cfg)
    return built
