"""Freezing: a stage's declared trainable set (from the stage table), applied and asserted at start (defect 2 of
the original code). Components are named as in :mod:`panobench.stages`.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

from panobench.errors import TrainingError
from panobench.stages import component_of

logger = logging.getLogger(__name__)


def apply_freeze(system: nn.Module, stage: str, declared: set[str], vision_trainable_blocks: int,
                 vision_layer_prefixes: list[str]) -> dict[str, list[int]]:
    """Set requires_grad from the declared set, assert it took effect, return {component: [trainable, total]}."""
    if not 0 <= vision_trainable_blocks <= len(vision_layer_prefixes):
        raise TrainingError(f"vision.trainable_blocks={vision_trainable_blocks} is outside [0, "
                            f"{len(vision_layer_prefixes)}] (the vision tower's number of blocks)")
    # Not prefixes[-n:]: for n = 0 that would be every block.
    trained_blocks = vision_layer_prefixes[len(vision_layer_prefixes) - vision_trainable_blocks:]
    names = [name for name, _ in system.named_parameters()]
    for prefix in trained_blocks if "vision" in declared else []:
        if not any(name.startswith(prefix) for name in names):
            raise TrainingError(f"stage {stage!r}: vision block prefix {prefix!r} matches no parameter")
    for name, param in system.named_parameters():
        comp = component_of(name)
        trainable = comp in declared
        if comp == "vision" and trainable:
            trainable = any(name.startswith(p) for p in trained_blocks) or ".post_layernorm." in name
        param.requires_grad_(trainable)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for name, param in system.named_parameters():
        comp = component_of(name)
        counts[comp][1] += param.numel()
        if param.requires_grad:
            counts[comp][0] += param.numel()
    counts = dict(counts)
    trained = {c for c, (t, _) in counts.items() if t > 0}
    if not trained:
        raise TrainingError(f"stage {stage!r}: the trainable set is empty")
    if trained != declared:
        raise TrainingError(f"stage {stage!r}: trainable components {sorted(trained)} != declared {sorted(declared)}")
    if counts.get("lm", [0, 0])[0] != 0:
        raise TrainingError(f"stage {stage!r}: LM base weights must stay frozen")
    if "lora" in declared and counts.get("lora", [0, 0])[0] == 0:
        raise TrainingError(f"stage {stage!r}: no trainable LoRA parameters (is LoRA attached?)")
    for comp, (t, total) in sorted(counts.items()):
        logger.info("stage %s: %-9s trainable %12d / %12d", stage, comp, t, total)
    return counts
