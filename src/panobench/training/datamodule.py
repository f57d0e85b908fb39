"""Data for training: the DataModule and a resumable sampler (collation: :mod:`panobench.data.collate`).

The training order is a pure function of (seed, step): ``ResumableSampler`` lays out the whole run's sample
sequence (concatenated seeded permutations) and starts at the number of samples already consumed, so a run resumed
from ``last.ckpt`` sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler

from panobench.config import RunConfig
from panobench.data.collate import TrainCollator
from panobench.data.csvdata import PanoramaCaptionDataset
from panobench.data.prompts import PromptBuilder


class ResumableSampler(Sampler[int]):
    """The whole run's sample order: epoch e of the dataset is ``randperm(n)`` seeded by (seed, e).

    ``__len__`` is always this rank's share of the whole run while iteration starts at ``start()`` — the number of
    samples consumed (by all ranks) before a resume, read when iteration begins (after the trainer restored
    ``global_step``). Lightning counts the batches it had already fetched in the interrupted epoch on top of what
    the new iterator yields, so a loader that shrank on resume would end the "epoch" early and then replay the same
    batches in a second one.

    DDP: the one global order is cut into consecutive chunks of ``chunk`` samples (one micro-batch) dealt to the
    ranks in turn, so ``world`` ranks see disjoint samples and one optimizer step of ``world`` ranks covers exactly
    the samples that ``world`` accumulated micro-batches cover on one device. ``world = 1`` is the plain order.
    """

    def __init__(self, n: int, total: int, seed: int, start: Callable[[], int] | int = 0, *, rank: int = 0,
                 world: int = 1, chunk: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside [0, {world})")
        self.n, self.total, self.seed = n, total, seed
        self.rank, self.world, self.chunk = rank, world, max(1, chunk)
        self._start = start

    @property
    def start(self) -> int:
        return int(self._start() if callable(self._start) else self._start)

    def __len__(self) -> int:
        full, rest = divmod(self.total, self.chunk)
        count = len(range(self.rank, full, self.world)) * self.chunk
        if rest and full % self.world == self.rank:   # the short last chunk falls to this rank
            count += rest
        return count

    def _global_order(self, start: int) -> Iterator[int]:
        epoch, offset = divmod(start, self.n)
        produced = start
        while produced < self.total:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            for idx in order[offset:]:
                if produced >= self.total:
                    return
                yield idx
                produced += 1
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[int]:
        start = self.start
        for position, idx in enumerate(self._global_order(start), start=start):
            if (position // self.chunk) % self.world == self.rank:
                yield idx


class ResumableLoader(DataLoader):
    """A DataLoader whose position is a function of the trainer's ``global_step`` (see :class:`ResumableSampler`).

    ``state_dict``/``load_state_dict`` make Lightning treat it as resumable mid-epoch; there is nothing to store
    because the position is recomputed from the restored step.
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class PanoDataModule(pl.LightningDataModule):
    """Train/valid loaders for one stage; the CSVs are validated (columns, paths) when set up."""

    def __init__(self, cfg: RunConfig, stage: str, prompts: PromptBuilder, pad_id: int) -> None:
        super().__init__()
        self.cfg, self.stage = cfg, stage
        self.stage_cfg = cfg.stages[stage]
        self.collate = TrainCollator(prompts, pad_id)
        self.train_set: PanoramaCaptionDataset | None = None
        self.valid_set: PanoramaCaptionDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        size = (self.cfg.data.erp_height, self.cfg.data.erp_width)
        if self.train_set is None:
            self.train_set = PanoramaCaptionDataset(self.cfg.data.train_csv, self.cfg.data.root, erp_size=size)
            self.valid_set = PanoramaCaptionDataset(self.cfg.data.valid_csv, self.cfg.data.root, erp_size=size)

    def samples_per_step(self) -> int:
        """Samples one optimizer step consumes over all ranks."""
        world = self.trainer.world_size if self.trainer is not None else 1
        return self.stage_cfg.batch_size * self.stage_cfg.accumulate_grad_batches * world

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        # Resume: the position is read from the trainer's global_step when iteration starts (after the restore).
        total = self.stage_cfg.max_steps * self.samples_per_step()
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = ResumableSampler(len(self.train_set), total, self.cfg.seed, start=self._consumed_samples,
                                   rank=rank, world=world, chunk=self.stage_cfg.batch_size)
        return ResumableLoader(self.train_set, batch_size=self.stage_cfg.batch_size, sampler=sampler,
                               collate_fn=self.collate, num_workers=self.cfg.data.num_workers,
                               persistent_workers=False, drop_last=False)

    def _consumed_samples(self) -> int:
        return self.trainer.global_step * self.samples_per_step() if self.trainer is not None else 0

    def val_dataloader(self) -> DataLoader:
        assert self.valid_set is not None
        return DataLoader(self.valid_set, batch_size=self.stage_cfg.batch_size, shuffle=False,
                          collate_fn=self.collate, num_workers=self.cfg.data.num_workers)
