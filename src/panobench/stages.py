"""The stage table: what each training stage trains and saves, where its weights come from and where it runs, and
what each evaluation captions with. Every other module asks this table instead of comparing stage names.

Pure Python (no torch, no Lightning), so the workflow, the config loader and the reports read it cheaply.

Components are named by parameter-name prefix inside the training system (checkpoint keys carry the same names):
``vision`` (SigLIP), ``resampler``, ``projector``, ``pe``, ``vicreg`` (stage-1 projector), ``lora`` (adapter
weights inside the LM) and ``lm`` (the LM's base weights, frozen in every stage).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:   # type-only: config imports this module for the stage names
    from panobench.config import RunConfig

CROP = "anyres-e2p"   # the seed's crop name, kept in the run-directory layout
COMPONENTS = ("vision", "resampler", "projector", "pe", "vicreg", "lora", "lm")

# When a stage trains the resampler (it is the one component whose training depends on the arm and the config).
ResamplerRule = Literal["always", "if_grid", "if_configured"]


@dataclass(frozen=True)
class Stage:
    """One training stage. ``trains``/``carries`` name components (see :data:`COMPONENTS`)."""

    name: str
    number: int                              # the order of training, 1-based
    objective: Literal["vicreg", "caption"]  # vicreg: overlapping tiles agree (no LM); caption: next-token loss
    trains: frozenset[str]                   # components every run of this stage trains (besides the resampler)
    resampler: ResamplerRule | None          # when it also trains the resampler: always; if the resampler keeps a
    # token grid (VICReg compares tokens of overlapping tiles); if stages.<name>.train_resampler; None: never
    carries: frozenset[str] = frozenset()    # saved although not necessarily trained: what evaluation needs
    vision_from_checkpoint: bool = True      # starts its vision tower from the stage-1 checkpoint when one is set
    previous: str | None = None              # the stage whose best.ckpt initialises ``inherits``
    inherits: tuple[str, ...] = ()
    attaches_lora: bool = False              # fresh LoRA adapters in the LM (saved as lora_weights/ too)
    per_cell: bool = True                    # trained for every cell; else once per stage-1 recipe, shared by cells
    defaults: Mapping[str, Any] = field(default_factory=dict)   # its StageConfig defaults (config.py)

    @property
    def captions(self) -> bool:
        """Whether the LM is in the loop (the stage can caption, has text tokens, can use gradient checkpointing)."""
        return self.objective == "caption"

    def trained_components(self, *, resampler_has_grid: bool, train_resampler: bool) -> set[str]:
        """The components this stage trains. Vision blocks: only the last ``vision.trainable_blocks``."""
        rule = {"always": True, "if_grid": resampler_has_grid, "if_configured": train_resampler, None: False}
        return set(self.trains) | ({"resampler"} if rule[self.resampler] else set())

    def saved_components(self, *, resampler_has_grid: bool, train_resampler: bool) -> set[str]:
        """What its checkpoints hold: what it trains plus what it carries forward (never the frozen backbones)."""
        return self.trained_components(resampler_has_grid=resampler_has_grid,
                                       train_resampler=train_resampler) | set(self.carries)


@dataclass(frozen=True)
class EvalStage:
    """One evaluation: which training stage's model it builds and whose weights it loads, and what image it sees."""

    name: str
    builds: str                              # the training stage whose model (and start weights) it builds
    weights: str | None                      # the training stage whose best.ckpt (else last.ckpt) it loads;
    # None: the untrained start of ``builds``
    image: Literal["dataset", "grey"] = "dataset"   # grey: a constant panorama (does the model use the image?)


_STAGE_LIST = (
    Stage("vision", 1, "vicreg", frozenset({"vision", "vicreg"}), "if_grid",
          vision_from_checkpoint=False, per_cell=False, defaults={"max_steps": 40, "lr": 1e-4}),
    Stage("resampler", 2, "caption", frozenset({"projector", "pe"}), "always",
          defaults={"max_steps": 100, "lr": 2e-3}),
    # The resampler is saved even when frozen (train_resampler: false): evaluation loads it from this checkpoint.
    Stage("finetune", 3, "caption", frozenset({"lora", "projector", "pe"}), "if_configured",
          carries=frozenset({"resampler"}), previous="resampler", inherits=("resampler", "projector", "pe"),
          attaches_lora=True, defaults={"max_steps": 100, "lr": 1e-3}),
)
STAGES: Mapping[str, Stage] = MappingProxyType({s.name: s for s in _STAGE_LIST})
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)
PER_CELL_STAGES: tuple[str, ...] = tuple(s.name for s in _STAGE_LIST if s.per_cell)   # trained for every cell
RECIPE_STAGE: str = next(s.name for s in _STAGE_LIST if not s.per_cell)   # the stage-1 recipes' (shared) stage
FINAL_STAGE: str = _STAGE_LIST[-1].name

# baseline = the untrained stage-2 start (the floor); resampler/finetune = that stage's best.ckpt; blind = the
# finetuned model shown a constant grey panorama (does it use the image at all?).
_EVAL_LIST = (
    EvalStage("baseline", builds="resampler", weights=None),
    EvalStage("resampler", builds="resampler", weights="resampler"),
    EvalStage("finetune", builds="finetune", weights="finetune"),
    EvalStage("blind", builds="finetune", weights="finetune", image="grey"),
)
EVAL_STAGES: Mapping[str, EvalStage] = MappingProxyType({e.name: e for e in _EVAL_LIST})
EVAL_STAGE_NAMES: tuple[str, ...] = tuple(EVAL_STAGES)


def get_stage(name: str) -> Stage:
    """The table row of training stage ``name``; ValueError naming the valid stages otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; expected one of {list(STAGE_NAMES)}")
    return STAGES[name]


def eval_stage_of(stage: str) -> str | None:
    """The evaluation that captions with training stage ``stage``'s own weights and the real image (None: none)."""
    return next((e.name for e in _EVAL_LIST if e.weights == stage and e.image == "dataset"), None)


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


# ------------------------------------------------------------------------------------------ run directories


def run_dir(runs_dir: str, name: str, experiment: str, stage: str, resampler: str) -> str:
    """<runs_dir>/<name>/<experiment>/<stage>/<crop>_<resampler>: the seed's layout (experiment = cell or recipe id).

    Plain string formatting, so Snakemake wildcards (``{cell}``) pass through unchanged.
    """
    return f"{runs_dir}/{name}/{experiment}/{stage}/{CROP}_{resampler}"


def stage_dir(cfg: RunConfig, stage: str) -> Path:
    """The run directory of ``stage`` of the cell (or recipe) that ``cfg`` describes."""
    return Path(run_dir(cfg.runs_dir, cfg.name, cfg.cell_id, stage, cfg.resampler.type))


def relative_to_dir(path: str | os.PathLike, directory: str | os.PathLike) -> str:
    """``path`` as seen from ``directory`` (both taken from the working directory): what a run directory records,
    so the run tree evaluates from any working directory and after being copied elsewhere as a whole."""
    return Path(os.path.relpath(Path(path).absolute(), Path(directory).absolute())).as_posix()
