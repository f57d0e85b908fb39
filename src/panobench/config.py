"""The resolved run configuration: nested frozen dataclasses loaded strictly from YAML.

One resolved config describes one cell of the matrix (overlap, FOV, resampler, vision checkpoint, seed) and is
the only input that training and evaluation read. ``load_run_config`` rejects unknown keys and wrong types with a
message naming the key; the hash of the canonical JSON form identifies the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from panobench.errors import ConfigError
from panobench.stages import STAGE_NAMES, STAGES


# fmt: off
@dataclass(frozen=True)
class DataConfig:
    root: str = "data/synthetic"             # data root: relative CSV urls resolve against it
    train_csv: str = "data/synthetic/train.csv"
    valid_csv: str = "data/synthetic/valid.csv"
    test_csv: str = "data/synthetic/test.csv"
    erp_height: int = 256                    # working ERP size; images are resized to it so batches stack
    erp_width: int = 512
    num_workers: int = 0                     # DataLoader workers (seeded)
    max_eval_samples: int | None = None      # cap on (image, query) groups evaluated; None = all


@dataclass(frozen=True)
class GeometryConfig:
    overlap: float = 0.5                     # nominal overlap ratio of neighbouring tiles, in [0, 1)
    fov: float = 90.0                        # tile field of view in degrees, in (0, 180)
    pitch_rows: tuple[float, ...] = (0.0,)   # pitch of each ring of tiles, degrees
    include_global: bool = True              # append the squashed whole-ERP view


@dataclass(frozen=True)
class VisionConfig:
    name_or_path: str = "resources/tiny/vision"   # hub id or local directory (from_pretrained)
    init: Literal["pretrained", "random"] = "pretrained"
    arch: dict[str, Any] = field(default_factory=dict)   # SiglipVisionConfig fields when init == random
    checkpoint: str | None = None            # stage-1 (vision) checkpoint to start stages 2-3 from
    checkpoint_name: str = "pretrained"      # the matrix knob naming that checkpoint
    reuse_resampler: bool = False            # opt-in: start the resampler from the stage-1 checkpoint too (default:
    # only the vision tower, which every arm shares; reuse is refused unless every arm can use the weights)
    trainable_blocks: int = 2                # stage 1 trains the last N encoder blocks


@dataclass(frozen=True)
class ResamplerSection:
    type: str = "mlp"                        # key of panobench.models.resamplers.RESAMPLERS
    tokens_per_view: int | None = None       # visual tokens each view hands the LM; every resampler derives its
    # own size from it (pool_factor of mlp/bimamba, num_queries, num_latents); None = params alone decide
    params: dict[str, Any] = field(default_factory=dict)  # its <Name>Config fields (in_dim is filled in); a key
    # set here wins over the one derived from tokens_per_view (an unequal budget on purpose: the report warns);
    # bimamba: allow_reference_on_cuda: true permits the pure-PyTorch scan on a GPU (~1000x slower)


@dataclass(frozen=True)
class PEConfig:
    enabled: bool = True                     # add the panorama positional encoding to vision tokens
    yaw_frequencies: int = 4                 # sin/cos(k*yaw), k = 1..K: periodic, continuous across the seam
    pitch_frequencies: int = 2               # sin/cos(k*pitch)


@dataclass(frozen=True)
class LLMConfig:
    name_or_path: str = "resources/tiny/llm"     # hub id or local directory
    tokenizer: str | None = None             # defaults to name_or_path
    init: Literal["pretrained", "random"] = "pretrained"
    arch: dict[str, Any] = field(default_factory=dict)   # Qwen3Config fields when init == random


@dataclass(frozen=True)
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class StageConfig:
    max_steps: int = 100                     # optimizer steps
    batch_size: int = 8
    accumulate_grad_batches: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    val_every_n_steps: int = 50              # validation (and best.ckpt selection) interval
    limit_val_batches: int = 4
    checkpoint_every_n_steps: int = 25       # last.ckpt interval: what an interrupted run resumes from
    train_resampler: bool = True             # finetune only: keep training the resampler
    gradient_checkpointing: bool = False     # recompute LM decoder layers in backward (see docs of the GPU configs)
    compile: bool | None = None              # torch.compile this stage's transformer blocks; None = runtime.compile
    vicreg_sim_weight: float = 25.0          # vision only: VICReg invariance/variance/covariance weights
    vicreg_var_weight: float = 25.0
    vicreg_cov_weight: float = 1.0


def _default_stages() -> dict[str, StageConfig]:
    return {name: StageConfig(**stage.defaults) for name, stage in STAGES.items()}


@dataclass(frozen=True)
class EvalConfig:
    max_new_tokens: int = 40
    num_beams: int = 1                       # greedy by default; one decoding config for every arm
    do_sample: bool = False
    batch_size: int = 16
    # Greedy fast path (num_beams 1, no sampling): the same tokens as plain generate, faster.
    static_cache: bool = True                # preallocated KV cache; fixed shapes (prompts left-padded to the
    # longest of the eval set; with a compiled decode step, a short last batch filled with dropped repeats)
    compile: bool | None = None              # torch.compile the decode step (needs static_cache); None = runtime.compile
    merge_lora: bool = True                  # fold LoRA into the LM weights before generating (stage-3 weights)


@dataclass(frozen=True)
class RuntimeConfig:
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int = 1                         # > 1: Lightning DDP
    precision: str = "32-true"               # Lightning precision, e.g. "bf16-mixed" on GPUs
    deterministic: bool = True               # torch deterministic algorithms (CPU runs are bit-reproducible)
    measure_flops: bool = True               # count model FLOPs of one step (panobench.measurement.flops)
    measure_warmup_steps: int = 2            # steps excluded from step-time statistics
    device_peak_tflops: float | None = None  # dense bf16 peak for MFU; None = the datasheet table by device name
    compile: bool = False                    # torch.compile each LM and vision transformer block (inductor on
    # CUDA; aot_eager on CPU: the same tracing path without code generation) and the eval decode step


@dataclass(frozen=True)
class RunConfig:
    name: str = "default"                    # config name (report folder)
    cell_id: str = "cell"                    # built from every matrix knob; never parsed back
    seed: int = 0
    runs_dir: str = "runs"
    prompt_instruction: str = "Describe the {query} in this panorama."
    stitching: Literal["concat", "dedupe"] = "concat"
    data: DataConfig = field(default_factory=DataConfig)
    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerSection = field(default_factory=ResamplerSection)
    pe: PEConfig = field(default_factory=PEConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    stages: dict[str, StageConfig] = field(default_factory=_default_stages)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
# fmt: on


# ----------------------------------------------------------------------------------------------------------------
# strict construction from plain data


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples / dicts to dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key {key!r}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {type(value).__name__}")
        val_tp = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key!r}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key!r}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key!r}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config key {key!r}: unsupported annotation {tp!r}")  # pragma: no cover


def checked_fields(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The keyword arguments of dataclass ``cls`` from plain ``data``: unknown keys and wrong types rejected.

    The one strict check of plain config data against typed dataclass fields: the run config's sections and each
    resampler's ``<Name>Config`` (``models.resamplers.base.config_from_params``, prefix ``resampler.params``) both go
    through it, so both accept the same inputs (an int for a float, a list for a tuple) and name keys the same way.

    Args:
        cls: a dataclass whose fields carry type annotations.
        data: the mapping to check.
        prefix: the dotted key of ``data`` in the config file, named in error messages.

    Raises:
        ConfigError: naming the full key, the bad value and what was expected.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s}; expected one of {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _build_stages(value) if cls is RunConfig and name == "stages" else _coerce(value, hints[name], key)
    return kwargs


def _build_stages(value: Any) -> dict[str, StageConfig]:
    """``stages``: each stage given is its defaults with the given keys replaced (a partial stage is allowed)."""
    if not isinstance(value, dict):
        raise ConfigError("config key 'stages': expected a mapping of stage name -> settings")
    stages = dict(_default_stages())
    for stage_name, stage_data in value.items():
        if stage_name not in STAGES:
            raise ConfigError(f"unknown config key stages.{stage_name}; expected one of {list(STAGE_NAMES)}")
        base = dataclasses.asdict(stages[stage_name])
        base.update(stage_data or {})
        stages[stage_name] = _build(StageConfig, base, f"stages.{stage_name}")
    return stages


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    obj = cls(**checked_fields(cls, data, prefix))
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    if isinstance(obj, GeometryConfig):
        if not 0.0 <= obj.overlap < 1.0:
            raise ConfigError(f"config key {prefix}.overlap: {obj.overlap} is outside [0, 1)")
        if not 0.0 < obj.fov < 180.0:
            raise ConfigError(f"config key {prefix}.fov: {obj.fov} is outside (0, 180)")
    if isinstance(obj, ResamplerSection) and obj.tokens_per_view is not None and obj.tokens_per_view < 1:
        raise ConfigError(f"config key {prefix}.tokens_per_view: must be >= 1, got {obj.tokens_per_view}")
    if isinstance(obj, StageConfig):
        for name in ("max_steps", "batch_size", "accumulate_grad_batches", "val_every_n_steps"):
            if getattr(obj, name) < 1:
                raise ConfigError(f"config key {prefix}.{name}: must be >= 1, got {getattr(obj, name)}")
    # resampler.type is checked against the registry (models.resamplers.check_resampler_type) when the matrix is
    # expanded and again when the model is built: config sits below models and does not import them.


def run_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from plain data, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"a run config must be a mapping, got {type(data).__name__}")
    return _build(RunConfig, data)


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read a resolved run config YAML (``yaml.safe_load``) strictly."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return run_config_from_dict(data or {})
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form (tuples as lists) suitable for YAML/JSON."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def config_hash(data: Any) -> str:
    """Short stable hash of a config (dataclass or plain data): sha256 of its canonical JSON."""
    if dataclasses.is_dataclass(data):
        data = config_to_dict(data)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_signature(cfg: RunConfig) -> dict[str, Any]:
    """The settings that determine parameter shapes and semantics; stored in every checkpoint, compared on load."""
    full = config_to_dict(cfg)
    return {
        "geometry": full["geometry"],
        "vision": {k: full["vision"][k] for k in ("name_or_path", "init", "arch")},
        "resampler": {k: full["resampler"][k] for k in ("type", "tokens_per_view", "params")},
        "pe": full["pe"],
        "stitching": full["stitching"],
        "llm": {k: full["llm"][k] for k in ("name_or_path", "init", "arch")},
        "lora": full["lora"],
    }


def dump_run_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    from panobench.utils.io import write_yaml_atomic

    write_yaml_atomic(path, config_to_dict(cfg))
