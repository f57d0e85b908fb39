"""A Lightning ``CheckpointIO`` whose saves are atomic on every filesystem.

Lightning's default (``TorchCheckpointIO`` -> ``_atomic_save``) writes the checkpoint to a file in the *system* temp
directory and then ``shutil.move``s it onto the target. When ``$TMPDIR`` and the run directory are on different
filesystems (node-local /tmp vs. a shared cluster filesystem), that move is a copy into the final path: a reader
(the next stage, a concurrent evaluation) or a resume after a kill can see a half-written ``*.ckpt``, and a killed
job leaves a checkpoint-sized file in /tmp. Writing the temporary file *beside* the target and renaming it makes
the replacement atomic everywhere.

Usage: ``pl.Trainer(..., plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from panobench.utils.io import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``path`` via a temporary file in the same directory + ``os.replace``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
