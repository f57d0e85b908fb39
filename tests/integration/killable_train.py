"""Test helper (not part of the library): ``panobench train`` that blocks once a given step is about to start.

``test_checkpoints.py`` runs this as a subprocess, waits for the barrier file and SIGKILLs it — a real,
unannounced kill in the middle of a run, after ``last.ckpt`` was written for an earlier step.

Environment: ``PANOBENCH_TEST_PAUSE_AT_STEP`` (global step whose batch blocks) and ``PANOBENCH_TEST_BARRIER``
(file written, holding that step, when the run blocks). Arguments are those of ``panobench``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import panobench.training.runner as runner
from panobench.cli import main

PAUSE_AT = int(os.environ["PANOBENCH_TEST_PAUSE_AT_STEP"])
BARRIER = Path(os.environ["PANOBENCH_TEST_BARRIER"])


class PausingThroughputCallback(runner.ThroughputCallback):
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if trainer.global_step == PAUSE_AT:
            BARRIER.write_text(str(trainer.global_step))
            while True:  # wait for SIGKILL
                time.sleep(0.5)


if __name__ == "__main__":
    torch.set_num_threads(1)
    runner.ThroughputCallback = PausingThroughputCallback
    sys.exit(main(sys.argv[1:]))
