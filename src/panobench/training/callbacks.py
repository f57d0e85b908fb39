"""Lightning callbacks: per-step timing for the stage's measurements.json, and the first-step gradient-flow check."""

from __future__ import annotations

import logging
from typing import Any

import lightning.pytorch as pl
import torch

from panobench.errors import TrainingError
from panobench.measurement.throughput import StepClock, reset_peak_gpu_memory
from panobench.training.stages import component_of

logger = logging.getLogger(__name__)


class ThroughputCallback(pl.Callback):
    """Times every training batch (forward, backward and, at accumulation boundaries, the optimizer step)."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self.samples: list[int] = []
        self.text_tokens: list[int] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reset_peak_gpu_memory()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.clock.start()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.stop()
        self.samples.append(int(batch["erp"].shape[0]))
        self.text_tokens.append(int(batch["attention_mask"].sum()))


class GradientFlowCheck(pl.Callback):
    """At the first optimizer step: every trainable component received a non-zero gradient, no frozen one any.

    ``requires_grad`` says what *may* train; this checks what the graph actually reaches (a detached branch, a
    ``torch.no_grad`` in the wrong place, or an adapter outside the forward pass would otherwise train nothing in
    silence). Checked per component (``training.stages.COMPONENTS``), not per tensor: LoRA's A matrices get an
    exactly zero gradient at the first step because B starts at zero, and that is correct. Any violation stops the
    job, naming the components and example parameters. ``report`` ends up in measurements.json.
    """

    def __init__(self) -> None:
        self.report: dict[str, Any] | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.report is not None:
            return
        norms: dict[str, float] = {}
        unreached: dict[str, list[str]] = {}
        frozen_with_grad: list[str] = []
        for name, param in pl_module.named_parameters():
            comp = component_of(name)
            if not param.requires_grad:
                if param.grad is not None:
                    frozen_with_grad.append(name)
                continue
            norm = 0.0 if param.grad is None else float(param.grad.detach().float().norm())
            norms[comp] = (norms.get(comp, 0.0) ** 2 + norm**2) ** 0.5
            if param.grad is None:
                unreached.setdefault(comp, []).append(name)
        dead = sorted(c for c, n in norms.items() if not (n > 0.0 and torch.isfinite(torch.tensor(n))))
        stage = getattr(pl_module, "stage", "?")
        problems = []
        if dead:
            problems.append("trainable component(s) with no non-zero finite gradient: " + ", ".join(
                f"{c} (e.g. {unreached.get(c, ['all gradients zero'])[:2]})" for c in dead))
        if frozen_with_grad:
            problems.append(f"frozen parameter(s) with a gradient: {frozen_with_grad[:5]}")
        if problems:
            raise TrainingError(f"stage {stage!r}, step {trainer.global_step}: gradient-flow check failed: "
                                + "; ".join(problems))
        for comp, names in sorted(unreached.items()):
            logger.warning("stage %s: %d trainable %s parameter(s) got no gradient at the first step (e.g. %s)",
                           stage, len(names), comp, names[:3])
        self.report = {"step": int(trainer.global_step), "grad_norm_by_component": dict(sorted(norms.items())),
                       "trainable_without_grad": sum(len(v) for v in unreached.values())}
        logger.info("stage %s: gradient flow ok at step %d: %s", stage, trainer.global_step,
                    {c: f"{n:.3g}" for c, n in self.report["grad_norm_by_component"].items()})


class LossCurve(pl.Callback):
    """The training-loss curve: per optimizer step, the mean loss over its micro-batches and, under DDP, all ranks.

    This is the quantity that must not change when the same global batch is split differently (batch 8 ×
    accumulation 2 on one GPU vs batch 8 on each of two GPUs: the same samples per optimizer step). Micro-batch
    losses are kept per rank during training and gathered once at the end, so the steps pay no extra collective.
    """

    def __init__(self) -> None:
        self.micro: list[float] = []
        self.start_step: int | None = None
        self.curve: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.start_step is None:
            self.start_step = int(trainer.global_step)   # > 0 after a resume: the curve covers this run only

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.micro.append(float(pl_module.step_losses[-1]))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        losses = torch.tensor(self.micro, dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            losses = pl_module.all_gather(losses).mean(dim=0)   # [world, n] -> [n]: same micro-batch index
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        steps = losses.numel() // accumulate
        self.curve = losses[: steps * accumulate].view(steps, accumulate).mean(dim=1).tolist() if steps else []

    def record(self) -> dict[str, Any]:
        return {"curve": self.curve, "curve_start_step": self.start_step}
