"""Lightning callbacks: per-step timing and memory for the stage's measurements.json."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from panobench.measurement.throughput import StepClock, reset_peak_gpu_memory


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
