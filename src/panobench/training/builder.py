"""Build a stage's training system from a resolved config: the model with its start weights, then freezing.

Model assembly and start weights live in :mod:`panobench.models.assembly` (shared with evaluation); this module
adds what only training needs: the LightningModule, gradient checkpointing and the asserted trainable set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from panobench.config import RunConfig
from panobench.data.prompts import PromptBuilder
from panobench.models.assembly import build_stage_model, compute_dtype, enable_gradient_checkpointing
from panobench.stages import get_stage
from panobench.training.stages import apply_freeze
from panobench.training.system import PanoVLMSystem

logger = logging.getLogger(__name__)


@dataclass
class Built:
    system: PanoVLMSystem
    prompts: PromptBuilder
    tokenizer: Any
    param_counts: dict[str, list[int]] = field(default_factory=dict)
    resampler_init: str = "fresh"
    init_sources: dict[str, str | None] = field(default_factory=dict)
    vision_checkpoint: str | None = None     # the stage-1 checkpoint the vision tower came from
    previous_checkpoint: str | None = None   # the previous stage's checkpoint the inherited components came from


def stage_compiles(cfg: RunConfig, stage: str) -> bool:
    """Whether ``stage`` runs with compiled blocks: the stage's own ``compile`` if set, else ``runtime.compile``."""
    own = cfg.stages[stage].compile
    return cfg.runtime.compile if own is None else own


def build_stage(cfg: RunConfig, stage: str, *, vision_checkpoint: str | None = None,
                previous_stage_checkpoint: str | None = None, freeze: bool = True) -> Built:
    """The system for ``stage`` with its initial weights and trainable set (asserted)."""
    spec = get_stage(stage)
    start = build_stage_model(cfg, stage, vision_checkpoint=vision_checkpoint,
                              previous_stage_checkpoint=previous_stage_checkpoint)
    model = start.model
    system = PanoVLMSystem(cfg, stage, model)
    system.vision_checkpoint = start.vision_checkpoint
    if spec.captions and cfg.stages[stage].gradient_checkpointing:
        enable_gradient_checkpointing(model)
    counts: dict[str, list[int]] = {}
    if freeze:
        declared = spec.trained_components(resampler_has_grid=model.resampler.output_grid(model.vision.grid)
                                           is not None, train_resampler=cfg.stages[stage].train_resampler)
        # Parameter-name prefixes of the vision blocks, found by module identity (the nesting differs between
        # transformers versions; a hard-coded path silently matched nothing and froze every block).
        names = {id(module): name for name, module in system.named_modules()}
        prefixes = [names[id(layer)] + "." for layer in model.vision.encoder_layers()]
        counts = apply_freeze(system, stage, declared, cfg.vision.trainable_blocks, prefixes)
        if "vision" in declared and compute_dtype(cfg) is not None:
            # A stage that trains the last vision blocks keeps them in fp32 (AMP master weights); the frozen rest
            # of the tower is stored in bf16 like in the other stages, so autocast does not re-cast its weights.
            for p in system.model.vision.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(compute_dtype(cfg))
    return Built(system, start.prompts, start.tokenizer, counts, start.resampler_init, start.init_sources,
                 start.vision_checkpoint, start.previous_checkpoint)
