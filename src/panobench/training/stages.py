"""What each stage trains: the declared trainable set, applied and asserted at start (defect 2 of the original code).

Components are named by parameter-name prefix inside :class:`PanoVLMSystem`:
``vision`` (SigLIP), ``resampler``, ``projector``, ``pe``, ``vicreg`` (stage-1 projector), ``lora`` (adapter
weights inside the LM) and ``lm`` (the LM's base weights, frozen in every stage).
"""

from __future__ import annotations

import logging
from collections import defaultdict

from torch import nn

from panobench.errors import TrainingError

logger = logging.getLogger(__name__)

COMPONENTS = ("vision", "resampler", "projector", "pe", "vicreg", "lora", "lm")


def component_of(name: str) -> str:
    """Component of a parameter name relative to the system (``model.`` / ``vicreg_projector.`` prefixes)."""
    if name.startswith("vicreg_projector."):
        return "vicreg"
    rel = name.removeprefix("model.")
    if rel.startswith("lm."):
        return "lora" if "lora_" in rel else "lm"
    head = rel.split(".", 1)[0]
    if head not in COMPONENTS:
        raise ValueError(f"parameter {name!r} belongs to no known component")
    return head


def declared_trainable(stage: str, *, resampler_has_grid: bool, train_resampler: bool) -> set[str]:
    """The components a stage trains. Vision blocks: only the last N (see ``apply_freeze``)."""
    if stage == "vision":
        # Query-based resamplers have no token grid to apply the ray correspondences to, so stage 1 leaves them out.
        return {"vision", "vicreg"} | ({"resampler"} if resampler_has_grid else set())
    if stage == "resampler":
        return {"resampler", "projector", "pe"}
    if stage == "finetune":
        return {"lora", "projector", "pe"} | ({"resampler"} if train_resampler else set())
    raise ValueError(f"unknown stage {stage!r}")


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
    if stage == "finetune" and counts.get("lora", [0, 0])[0] == 0:
        raise TrainingError("stage 'finetune': no trainable LoRA parameters (is LoRA attached?)")
    for comp, (t, total) in sorted(counts.items()):
        logger.info("stage %s: %-9s trainable %12d / %12d", stage, comp, t, total)
    return counts
