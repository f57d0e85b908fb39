"""The one place that loads the two backbones (SigLIP vision tower, Qwen3 causal LM) and the tokenizer.

Both ``init="pretrained"`` (a hub id or a local directory, through the transformers Auto/``from_pretrained`` path)
and ``init="random"`` (an architecture dict, for full-size speed runs where no weights can be downloaded) go
through here, so the tiny materialized models and the real checkpoints share one code path.

Loads are strict: a pretrained vision tower or LM whose checkpoint lacks weights the model expects is an error,
never a silent random init (SPEC §2.4).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen3Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from panobench.data.prompts import IM_END, VISION_END, VISION_PLACEHOLDER, VISION_START
from panobench.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

INITS = ("pretrained", "random")

FULL_VISION_ID = "google/siglip2-so400m-patch16-256"

# Vision tower of google/siglip2-so400m-patch16-256 (its config.json is a SiglipConfig, model_type "siglip";
# these are the SiglipVisionConfig field names). 256/16 = 16x16 = 256 patch tokens of width 1152.
FULL_VISION_ARCH: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 256,
    "patch_size": 16,
}

# Qwen/Qwen3-0.6B (Qwen3Config field names; transformers 5 keeps rope_theta inside rope_parameters).
FULL_LLM_ARCH: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "bos_token_id": 151643,  # <|endoftext|>
    "eos_token_id": 151645,  # <|im_end|>
}

# Vision checkpoints we can read as a fixed-resolution SigLIP tower: [B, 3, H, W] in, [B, S, Dv] out.
_SIGLIP_TYPES = ("siglip", "siglip_vision_model")
# SigLIP2 NaFlex checkpoints take pre-patchified pixels plus spatial_shapes; our tiler produces square views.
_NAFLEX_TYPES = ("siglip2", "siglip2_vision_model")
# Weights of a full SigLIP checkpoint that the vision tower alone does not use.
_IGNORED_VISION_PREFIXES = ("text_model.", "logit_scale", "logit_bias")
SUPPORTED_LM_TYPES = ("qwen3",)

_OFFLINE_HINT = (
    "model hubs cannot be reached on the project's machines: run `panobench materialize` for the tiny local "
    "models, point the config at a local copy of the checkpoint, or use init: random with an arch"
)


def load_vision_backbone(
    name_or_path: str,
    *,
    init: str = "pretrained",
    arch: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
) -> PreTrainedModel:
    """Load the SigLIP vision tower.

    Args:
        name_or_path: hub id or local directory (a full ``SiglipConfig`` checkpoint, of which only the vision
            tower is loaded, or a directory saved from ``SiglipVisionModel``). With ``init="random"`` and no
            ``arch`` its config gives the architecture; otherwise it only names the model in logs.
        init: ``"pretrained"`` or ``"random"``.
        arch: ``SiglipVisionConfig`` fields. Required for ``init="random"`` unless ``name_or_path`` is a local
            checkpoint; with ``init="pretrained"`` every given field must equal the checkpoint's.
        dtype: parameter dtype (``torch.bfloat16`` or ``"bfloat16"``); None keeps float32 / the checkpoint's.

    Returns:
        A ``SiglipVisionModel``: ``model(pixel_values [B, 3, H, W]).last_hidden_state`` is ``[B, S, Dv]`` with
        ``S = (image_size / patch_size) ** 2``.
    """
    _check_init(init, name_or_path)
    torch_dtype = _as_dtype(dtype)
    if arch is not None:
        _check_arch_keys(arch, SiglipVisionConfig, "config key vision.arch")
    if init == "random":
        config = _build_config(SiglipVisionConfig, arch, "config key vision.arch") if arch is not None \
            else _vision_config_of(name_or_path, _resolve_source(name_or_path, "vision backbone"))
        _check_vision_config(config, name_or_path)
        model = SiglipVisionModel(config)
        logger.info("vision backbone: random init, %s", _describe(config, SiglipVisionConfig))
        return model.to(torch_dtype) if torch_dtype is not None else model

    source = _resolve_source(name_or_path, "vision backbone")
    config = _vision_config_of(name_or_path, source)
    if arch is not None:
        _check_arch_matches(arch, config, name_or_path)
    _check_vision_config(config, name_or_path)
    try:
        model, info = SiglipVisionModel.from_pretrained(
            source, config=config, dtype=torch_dtype, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load vision weights from {name_or_path!r}: {_one_line(err)}") from err
    _check_loading_info(info, name_or_path, ignored_prefixes=_IGNORED_VISION_PREFIXES)
    logger.info("vision backbone: %s, %s", name_or_path, _describe(config, SiglipVisionConfig))
    return model


def load_language_model(
    name_or_path: str,
    *,
    init: str = "pretrained",
    arch: dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = None,
) -> PreTrainedModel:
    """Load the Qwen3 causal LM through ``AutoModelForCausalLM``.

    Args:
        name_or_path: hub id or local directory. With ``init="random"`` and no ``arch`` its config gives the
            architecture; otherwise it only names the model in logs.
        init: ``"pretrained"`` or ``"random"``.
        arch: ``Qwen3Config`` fields (hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
            num_key_value_heads, head_dim, vocab_size, max_position_embeddings, tie_word_embeddings, ...).
            With ``init="pretrained"`` every given field must equal the checkpoint's.
        dtype: parameter dtype; None keeps float32 / the checkpoint's.

    Returns:
        A causal LM: ``model(input_ids [B, T]).logits`` is ``[B, T, vocab_size]``.
    """
    _check_init(init, name_or_path)
    torch_dtype = _as_dtype(dtype)
    if arch is not None:
        _check_arch_keys(arch, Qwen3Config, "config key llm.arch")
    if init == "random":
        if arch is not None:
            config = _build_config(Qwen3Config, arch, "config key llm.arch")
        else:
            config = _load_config(name_or_path, _resolve_source(name_or_path, "language model"))
        _check_lm_config(config, name_or_path)
        model = AutoModelForCausalLM.from_config(config)
        logger.info("language model: random init, %s", _describe(config, Qwen3Config))
        return model.to(torch_dtype) if torch_dtype is not None else model

    source = _resolve_source(name_or_path, "language model")
    config = _load_config(name_or_path, source)
    _check_lm_config(config, name_or_path)
    if arch is not None:
        _check_arch_matches(arch, config, name_or_path)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=torch_dtype, output_loading_info=True
        )
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load language-model weights from {name_or_path!r}: {_one_line(err)}") from err
    _check_loading_info(info, name_or_path, ignored_prefixes=())
    logger.info("language model: %s, %s", name_or_path, _describe(config, Qwen3Config))
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer through ``AutoTokenizer`` and check it can express our prompts.

    Raises:
        ConfigError: the path is missing, or the tokenizer lacks a vision token, ``<|im_end|>`` or a chat template.
    """
    source = _resolve_source(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {_one_line(err)}; {_OFFLINE_HINT}") from err
    vocab = tokenizer.get_vocab()
    for token in (VISION_PLACEHOLDER, VISION_START, VISION_END, IM_END):
        if token not in vocab:
            raise ConfigError(f"tokenizer {name_or_path!r} has no token {token!r}, which the VLM prompt needs")
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {name_or_path!r} has no chat template; the prompt builder renders with it")
    logger.info("tokenizer: %s, %d tokens", name_or_path, len(tokenizer))
    return tokenizer


def arch_fields(config_cls: type[PreTrainedConfig]) -> list[str]:
    """Architecture fields of a transformers config class: its own dataclass fields, not the generic ones."""
    generic = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    return [f.name for f in dataclasses.fields(config_cls) if f.name not in generic]


# --------------------------------------------------------------------------------------------- helpers


def _check_init(init: str, name_or_path: str) -> None:
    if init not in INITS:
        raise ConfigError(f"init={init!r} for {name_or_path!r}; expected one of {list(INITS)}")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype (e.g. 'float32', 'bfloat16')")
    return value


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator is meant as a filesystem path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or name.endswith("/")


def _resolve_source(name_or_path: str, what: str) -> str:
    """Return a local directory as a string path, or the hub id unchanged; a missing local path is an error."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ConfigError(f"{what}: expected a hub id or a local directory, got {name_or_path!r}")
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{what}: {str(path)!r} is a file; expected a checkpoint directory")
        return str(path)
    if _looks_like_path(str(name_or_path)):
        raise ConfigError(f"{what}: no such local directory {str(path)!r}; {_OFFLINE_HINT}")
    return str(name_or_path)


def _load_config(name_or_path: str, source: str) -> PreTrainedConfig:
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the model config of {name_or_path!r}: {_one_line(err)}; {_OFFLINE_HINT}") from err


def _vision_config_of(name_or_path: str, source: str) -> SiglipVisionConfig:
    config = _load_config(name_or_path, source)
    model_type = getattr(config, "model_type", None)
    if model_type in _NAFLEX_TYPES:
        raise ConfigError(
            f"vision backbone {name_or_path!r} is a SigLIP2 NaFlex checkpoint (model_type {model_type!r}), which "
            "takes patchified pixels plus spatial_shapes; use a fixed-resolution checkpoint such as "
            f"{FULL_VISION_ID!r} (model_type 'siglip')"
        )
    if model_type == "siglip":
        config = config.vision_config  # only the vision tower; the text tower's weights are never loaded
    elif model_type != "siglip_vision_model":
        raise ConfigError(
            f"vision backbone {name_or_path!r} has model_type {model_type!r}; expected one of {list(_SIGLIP_TYPES)}"
        )
    return config


def _check_arch_keys(arch: dict[str, Any], config_cls: type[PreTrainedConfig], what: str) -> None:
    if not isinstance(arch, dict):
        raise ConfigError(f"{what} must be a mapping of {config_cls.__name__} fields, got {type(arch).__name__}")
    allowed = arch_fields(config_cls)
    unknown = sorted(set(arch) - set(allowed))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {unknown}; expected {config_cls.__name__} fields {sorted(allowed)}")


def _build_config(config_cls: type[PreTrainedConfig], arch: dict[str, Any], what: str) -> PreTrainedConfig:
    try:
        return config_cls(**arch)
    except Exception as err:  # transformers' strict dataclass raises its own error types for bad values
        raise ConfigError(f"{what}: invalid {config_cls.__name__} values {arch}: {_one_line(err)}") from err


def _check_arch_matches(arch: dict[str, Any], config: PreTrainedConfig, name_or_path: str) -> None:
    for key, value in arch.items():
        actual = getattr(config, key, None)
        if actual != value:
            raise ConfigError(f"arch[{key!r}]={value!r} but checkpoint {name_or_path!r} has {actual!r}")


def _check_vision_config(config: SiglipVisionConfig, name_or_path: str) -> None:
    image_size, patch_size = config.image_size, config.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise ConfigError(f"vision backbone {name_or_path!r}: expected square int image_size/patch_size, "
                          f"got {image_size!r}/{patch_size!r}")
    if image_size % patch_size:
        raise ConfigError(f"vision backbone {name_or_path!r}: image_size={image_size} is not a multiple of "
                          f"patch_size={patch_size}")
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"vision backbone {name_or_path!r}: hidden_size={config.hidden_size} is not divisible "
                          f"by num_attention_heads={config.num_attention_heads}")


def _check_lm_config(config: PreTrainedConfig, name_or_path: str) -> None:
    if config.model_type not in SUPPORTED_LM_TYPES:
        raise ConfigError(f"language model {name_or_path!r} has model_type {config.model_type!r}; "
                          f"expected one of {list(SUPPORTED_LM_TYPES)}")
    if config.num_attention_heads % config.num_key_value_heads:
        raise ConfigError(f"language model {name_or_path!r}: num_attention_heads={config.num_attention_heads} is "
                          f"not a multiple of num_key_value_heads={config.num_key_value_heads}")


def _check_loading_info(info: dict[str, Any], name_or_path: str, *, ignored_prefixes: tuple[str, ...]) -> None:
    """Refuse partial loads: a missing weight would silently stay at its random init."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m) for m in info.get("mismatched_keys") or [])
    unexpected = sorted(k for k in info.get("unexpected_keys") or [] if not k.startswith(ignored_prefixes))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing weight(s) (e.g. {missing[:3]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape-mismatched weight(s) (e.g. {mismatched[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weight(s) (e.g. {unexpected[:3]})")
    if problems:
        raise CheckpointError(f"checkpoint {name_or_path!r} does not match its model: " + "; ".join(problems))


def _one_line(err: BaseException) -> str:
    """The CLI shows errors as one line; transformers' messages span several."""
    return " ".join(str(err).split())


def _describe(config: PreTrainedConfig, config_cls: type[PreTrainedConfig]) -> str:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size", "vocab_size")
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys if k in arch_fields(config_cls))
