"""Build a stage's system from a resolved config: backbones, PanoVLM, initial weights, LoRA, freezing.

Initial weights per stage:
- ``vision``: the pretrained vision tower (or random init for speed configs).
- ``resampler``: the stage-1 checkpoint (``vision.checkpoint`` or ``--resume``) when given: its vision encoder is
  loaded strictly; its resampler only with ``vision.reuse_resampler`` (and then it must fit) — recorded as
  ``resampler_init`` ("fresh" or "loaded").
- ``finetune``: the same vision source, plus the stage-2 ``best.ckpt`` of this cell, loaded strictly; then LoRA.
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
from panobench.models.vlm import PanoVLM
from panobench.training.stages import apply_freeze, component_of, declared_trainable
from panobench.training.system import PanoVLMSystem, check_same_run

logger = logging.getLogger(__name__)

CROP = "anyres-e2p"


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """runs/<name>/<experiment>/<stage>/<crop>_<resampler>/ — the seed's layout, one experiment per cell."""
    return Path(cfg.runs_dir) / cfg.name / cfg.cell_id / stage / f"{CROP}_{cfg.resampler.type}"


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with ``weights_only=True``; any failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any parse failure (a legacy-format text file raises IndexError) is one error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable weights-only checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not isinstance(ckpt.get("panobench"), dict):
        raise CheckpointError(f"{path}: not a panobench checkpoint (no state_dict/panobench metadata)")
    return ckpt


@dataclass
class Built:
    system: PanoVLMSystem
    prompts: PromptBuilder
    tokenizer: Any
    param_counts: dict[str, list[int]] = field(default_factory=dict)
    resampler_init: str = "fresh"
    init_sources: dict[str, str | None] = field(default_factory=dict)


def _dtype(cfg: RunConfig) -> torch.dtype | None:
    # Frozen backbones in bf16 when training in bf16: halves their memory and autocast no longer re-casts their
    # weights every step; trainable parts (resampler, projector, PE, LoRA) stay fp32 (AMP).
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

    The vision tower is built in bf16 only when it is frozen (every stage but ``vision``): stage 1 trains it.
    """
    tokenizer = load_tokenizer(cfg.llm.tokenizer or cfg.llm.name_or_path)
    device = build_device(cfg)
    vision_dtype = _dtype(cfg) if stage not in (None, "vision") else None
    with device if device is not None else contextlib.nullcontext():
        vision = load_vision_backbone(cfg.vision.name_or_path, init=cfg.vision.init, arch=dict(cfg.vision.arch),
                                      dtype=vision_dtype)
        lm = load_language_model(cfg.llm.name_or_path, init=cfg.llm.init, arch=dict(cfg.llm.arch), dtype=_dtype(cfg))
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


def _load_component(system: PanoVLMSystem, ckpt: dict[str, Any], comp: str, path: Path) -> None:
    """Copy one component's tensors strictly: same key set, same shapes."""
    own = {k: v for k, v in system.state_dict().items() if component_of(k) == comp}
    theirs = {k: v for k, v in ckpt["state_dict"].items() if component_of(k) == comp}
    if set(own) != set(theirs):
        missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
        raise CheckpointError(f"{path}: {comp} weights do not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]})")
    for k, v in theirs.items():
        if own[k].shape != v.shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, model expects {tuple(own[k].shape)}")
    with torch.no_grad():
        params = dict(system.named_parameters())
        for k, v in theirs.items():
            params[k].copy_(v.to(params[k].dtype))


def _load_vision_checkpoint(system: PanoVLMSystem, cfg: RunConfig, path: Path) -> str:
    """Stage-1 checkpoint -> the vision encoder (strict); the resampler only when ``vision.reuse_resampler``.

    Symmetric starts (SPEC §5b): by default a stage-1 checkpoint initialises only what every arm shares, the vision
    tower. Its resampler weights fit one resampler type, so loading them by default would pre-train one arm and
    not the others. With ``reuse_resampler`` they must fit this arm exactly (else an error, never a silent fresh
    init). Returns ``resampler_init``: "loaded" or "fresh".
    """
    ckpt = load_checkpoint_file(path)
    meta = ckpt["panobench"]
    if meta.get("stage") != "vision":
        raise CheckpointError(f"{path}: expected a stage-1 (vision) checkpoint, got stage {meta.get('stage')!r}")
    theirs, ours = meta["model_signature"]["vision"], model_signature(cfg)["vision"]
    if theirs != ours:
        raise CheckpointError(f"{path}: vision checkpoint was trained from {theirs}, this run uses {ours}")
    _load_component(system, ckpt, "vision", path)
    if not cfg.vision.reuse_resampler:
        return "fresh"
    res = meta.get("resampler", {})
    ckpt_has_resampler = any(component_of(k) == "resampler" for k in ckpt["state_dict"])
    if not ckpt_has_resampler or res.get("type") != cfg.resampler.type or \
            res.get("config") != system.model.resampler.config_dict():
        raise CheckpointError(
            f"{path}: vision.reuse_resampler is set but the checkpoint's resampler ({res.get('type')}, "
            f"{'weights' if ckpt_has_resampler else 'no weights'}) does not fit this arm's {cfg.resampler.type} "
            f"{system.model.resampler.config_dict()}; unset reuse_resampler to start every arm's resampler fresh")
    _load_component(system, ckpt, "resampler", path)
    return "loaded"


def stage_compiles(cfg: RunConfig, stage: str) -> bool:
    """Whether ``stage`` runs with compiled blocks: the stage's own ``compile`` if set, else ``runtime.compile``."""
    own = cfg.stages[stage].compile
    return cfg.runtime.compile if own is None else own


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
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=list(cfg.lora.target_modules), bias="none")
    model.lm = get_peft_model(model.lm, lora)
    if _dtype(cfg) is not None:
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


def build_stage(cfg: RunConfig, stage: str, *, vision_checkpoint: str | None = None,
                previous_stage_checkpoint: str | None = None, freeze: bool = True) -> Built:
    """The system for ``stage`` with its initial weights and trainable set (asserted)."""
    torch.manual_seed(cfg.seed)   # fresh resampler/projector/PE init is a function of the seed
    model, tokenizer, prompts = build_model(cfg, stage)
    system = PanoVLMSystem(cfg, stage, model)
    sources: dict[str, str | None] = {"vision": cfg.vision.name_or_path, "llm": cfg.llm.name_or_path}
    resampler_init = "fresh"
    vision_ckpt = vision_checkpoint or cfg.vision.checkpoint
    if stage != "vision" and vision_ckpt:
        resampler_init = _load_vision_checkpoint(system, cfg, Path(vision_ckpt))
        sources["vision_checkpoint"] = str(vision_ckpt)
        system.vision_checkpoint = str(Path(vision_ckpt).resolve())
    if stage == "finetune":
        prev = Path(previous_stage_checkpoint or stage_dir(cfg, "resampler") / "best.ckpt")
        ckpt = load_checkpoint_file(prev)
        check_same_run(ckpt["panobench"], {"stage": "resampler", "model_signature": model_signature(cfg)},
                       what=f"stage-2 checkpoint {prev}")
        # Stage-2 checkpoints hold no vision weights: stage 3 must start from the same vision encoder.
        if "vision_checkpoint" in ckpt["panobench"] and ckpt["panobench"]["vision_checkpoint"] != \
                system.vision_checkpoint:
            raise CheckpointError(f"{prev}: stage 2 used vision checkpoint {ckpt['panobench']['vision_checkpoint']}, "
                                  f"this stage-3 run uses {system.vision_checkpoint} (set vision.checkpoint alike)")
        for comp in ("resampler", "projector", "pe"):
            if any(component_of(k) == comp for k in system.state_dict()):
                _load_component(system, ckpt, comp, prev)
        sources["stage2_checkpoint"] = str(prev)
        resampler_init = "stage2"
        attach_lora(model, cfg)
    if stage != "vision" and cfg.stages[stage].gradient_checkpointing:
        enable_gradient_checkpointing(model)
    counts: dict[str, list[int]] = {}
    if freeze:
        declared = declared_trainable(stage, resampler_has_grid=model.resampler.output_grid(model.vision.grid)
                                      is not None, train_resampler=cfg.stages[stage].train_resampler)
        # Parameter-name prefixes of the vision blocks, found by module identity (the nesting differs between
        # transformers versions; a hard-coded path silently matched nothing and froze every block).
        names = {id(module): name for name, module in system.named_modules()}
        prefixes = [names[id(layer)] + "." for layer in model.vision.encoder_layers()]
        counts = apply_freeze(system, stage, declared, cfg.vision.trainable_blocks, prefixes)
        if stage == "vision" and _dtype(cfg) is not None:
            # Stage 1 trains the last vision blocks in fp32 (AMP master weights); the frozen rest of the tower is
            # stored in bf16 like in stages 2-3, so autocast does not re-cast its weights every step.
            for p in system.model.vision.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(_dtype(cfg))
    return Built(system, prompts, tokenizer, counts, resampler_init, sources)


def load_stage_checkpoint(system: PanoVLMSystem, path: str | os.PathLike) -> dict[str, Any]:
    """Evaluation: load a stage checkpoint strictly into a freshly built system of the same stage and config."""
    path = Path(path)
    ckpt = load_checkpoint_file(path)
    check_same_run(ckpt["panobench"], system.checkpoint_metadata(), what=str(path))
    expected = set(system.saved_keys())
    got = set(ckpt["state_dict"])
    if got != expected:
        raise CheckpointError(f"{path}: keys differ from the model (missing {sorted(expected - got)[:3]}, "
                              f"unexpected {sorted(got - expected)[:3]})")
    system.load_state_dict(ckpt["state_dict"], strict=False)
    return {**ckpt["panobench"], "global_step": ckpt.get("global_step")}
